"""codec.py on its own: raw bytes with a dtype and shape, typed contents, BYTES elements,
layouts and the float -> UINT8 answer."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from purifier.errors import InvalidInputError
from purifier.proto.inference import grpc_service_pb2 as pb
from purifier.server import codec


def test_raw_round_trip_is_little_endian_and_length_checked():
    x = np.arange(6, dtype=">f4").reshape(2, 3)                       # big-endian in memory
    data = codec.to_raw(x)
    assert data == np.arange(6, dtype="<f4").tobytes()
    back = codec.from_raw(data, np.dtype("<f4"), [2, 3])
    np.testing.assert_array_equal(back, x)
    assert back.flags.writeable                                       # torch.from_numpy wants that
    with pytest.raises(InvalidInputError, match="has 20 bytes of raw data; shape \\[2, 3\\] of FP32 needs 24"):
        codec.from_raw(data[:-4], np.dtype("<f4"), [2, 3])
    with pytest.raises(InvalidInputError, match="negative dimension"):
        codec.from_raw(b"", np.dtype("<f4"), [-1, 3])
    # empty but absurd: numpy cannot even describe it (Hypothesis found it as an INTERNAL)
    with pytest.raises(InvalidInputError, match="declares more than"):
        codec.from_raw(b"", np.dtype("<f4"), [0] + [codec.MAX_ELEMENTS] * 4)


def test_typed_contents_round_trip_and_count_check():
    contents = pb.InferTensorContents()
    assert codec.fill_contents(contents, np.array([[1, 2], [3, 4]], np.int64)) == "INT64"
    np.testing.assert_array_equal(codec.from_contents(contents, "INT64", [2, 2]), [[1, 2], [3, 4]])
    with pytest.raises(InvalidInputError, match="4 values in int64_contents; shape \\[3\\] needs 3"):
        codec.from_contents(contents, "INT64", [3])
    with pytest.raises(InvalidInputError, match="cannot travel in contents"):
        codec.from_contents(contents, "BYTES", [1])


def test_bytes_elements_round_trip_and_truncation():
    items = [b"", b"abc", bytes(300)]
    assert codec.split_bytes_elements(codec.join_bytes_elements(items)) == items
    with pytest.raises(InvalidInputError, match="claims 9 bytes"):
        codec.split_bytes_elements(struct.pack("<I", 9) + b"abc")
    with pytest.raises(InvalidInputError, match="truncated BYTES element length"):
        codec.split_bytes_elements(b"\x01\x00")


def test_layout_guess_only_when_unambiguous():
    x = np.zeros((2, 3, 3, 3), np.float32)                             # C == H == W: NCHW unless told
    assert codec.to_nchw(x, (3, 3, 3))[1] == "NCHW"
    assert codec.to_nchw(np.zeros((2, 8, 8, 3), np.float32), (3, 8, 8))[1] == "NHWC"
    with pytest.raises(InvalidInputError, match="must be 4-D"):
        codec.to_nchw(np.zeros((8, 8), np.float32), (1, 8, 8))
    with pytest.raises(InvalidInputError, match="expects 8x8"):
        codec.to_nchw(np.zeros((2, 9, 9), np.float32), (1, 8, 8))


def test_uint8_answers_are_rounded_and_clipped():
    out = codec.to_dtype(np.array([0.0, 0.5, 1.0, 1.2, -0.1, 0.998], np.float32), "UINT8")
    np.testing.assert_array_equal(out, [0, 128, 255, 255, 0, 254])
    assert codec.to_dtype(np.zeros(2, np.float64), "FP32").dtype == np.float32
    with pytest.raises(InvalidInputError, match="no V2 datatype"):
        codec.v2_name(np.dtype("complex64"))


def test_decode_pool_refuses_beyond_its_pending_limit_and_runs_in_the_callers_context():
    import asyncio
    import threading

    from purifier.errors import OverloadedError
    from purifier.server import logs

    gate = threading.Event()

    def held(x, image_shape, limits):
        gate.wait(10)
        return logs.request_id.get(), image_shape, limits.max_images

    async def main():
        pool = codec.DecodePool((1, 8, 8), codec.DecodeLimits(max_images=3), threads=1, max_pending=1)
        logs.request_id.set("rid-7")
        first = asyncio.ensure_future(pool.run(held, None))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="being decoded"):
            await pool.run(held, None)
        gate.set()
        got = await first
        pool.close()
        return got

    assert asyncio.run(main()) == ("rid-7", (1, 8, 8), 3)
