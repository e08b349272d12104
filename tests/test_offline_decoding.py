"""``purifier purify`` reads image files as the service decodes a request's files
(``validation.decode_images``): a huge PNG is refused from its header or its size, before
its pixels exist, and a corrupt one is an error naming the file, not a crash."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from torchvision.utils import save_image

from purifier.errors import InvalidInputError
from purifier.offline import read_inputs
from purifier.validation import DecodeLimits, decode_images

SHAPE = (1, 8, 8)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(side: int) -> bytes:
    """A real, decodable side x side 8-bit grey PNG of zeros (~140 KB for 12000: 144 MB of pixels)."""
    raw = zlib.compress(bytes(side + 1) * side, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


# an 8x8 PNG whose IDAT is junk: torchvision's decode_image, which purify used before, dies
# of SIGSEGV on it (tests/service/test_hardening.py's BROKEN_PNG)
BROKEN = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
          + b"\x00\x00\x00\x04IDATjunk\x00\x00\x00\x00")


def test_a_huge_png_is_refused_from_its_header_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(png(12000))
    import PIL.Image

    def no_decoding(*a, **k):
        raise AssertionError("the decoder must not see a file its header already refuses")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    with pytest.raises(InvalidInputError, match=r"expects 8x8 images; .*huge\.png is a PNG of 12000x12000"):
        read_inputs([path], SHAPE)


def test_a_file_over_the_byte_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png(8) + bytes(9 * 1024 * 1024))           # a valid header, 9 MiB of trailing bytes
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail("read a file over the limit"))
    with pytest.raises(InvalidInputError, match=r"big\.png: file of \d+ bytes is above the limit"):
        read_inputs([path], SHAPE)


def test_not_an_image_and_a_corrupt_png_are_errors_naming_the_file(tmp_path):
    (tmp_path / "text.png").write_bytes(b"hello, not a picture")
    with pytest.raises(InvalidInputError, match=r"text\.png is not a decodable PNG or JPEG"):
        read_inputs([tmp_path / "text.png"], SHAPE)
    (tmp_path / "broken.png").write_bytes(BROKEN)
    with pytest.raises(InvalidInputError, match=r"broken\.png is not a decodable PNG or JPEG"):
        read_inputs([tmp_path / "broken.png"], SHAPE)


def test_good_files_read_as_the_service_decodes_them(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        save_image(torch.rand(1, 8, 8), str(p))
        paths.append(p)
    inputs = read_inputs(paths, SHAPE)
    expected = decode_images([p.read_bytes() for p in paths], SHAPE, DecodeLimits(max_images=3))
    np.testing.assert_array_equal((inputs.images * 255).round().byte().numpy(), expected)
    assert inputs.names == ["img0", "img1", "img2"]


def test_cli_refuses_a_huge_png_quickly_and_clearly(tmp_path, tiny_model_dir):
    (tmp_path / "huge.png").write_bytes(png(12000))
    proc = subprocess.run([sys.executable, "-m", "purifier.cli", "purify", str(tmp_path / "huge.png"),
                           "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--steps", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "huge.png is a PNG of 12000x12000" in proc.stderr and "Traceback" not in proc.stderr
