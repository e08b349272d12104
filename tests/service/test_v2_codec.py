"""The V2 codec on its own (no server): request tensors -> images, images/labels/errors ->
response tensors and parameters, options, output choice, the downstream's input spec."""

from __future__ import annotations

import numpy as np
import pytest

from purifier.errors import InvalidInputError
from purifier.projection import FAST
from purifier.proto.inference import grpc_service_pb2 as pb
from purifier.server import codec, v2
from purifier.server.dataplane import Purified

SHAPE = (1, 8, 8)


def request_with(arr, datatype: str, raw: bool = True, layout: str | None = None, name: str = "images"):
    req = pb.ModelInferRequest(model_name="m")
    inp = req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape) if datatype != "BYTES" else [len(arr)])
    if layout:
        inp.parameters["layout"].string_param = layout
    if datatype == "BYTES":
        if raw:
            req.raw_input_contents.append(codec.join_bytes_elements(arr))
        else:
            inp.contents.bytes_contents.extend(arr)
    elif raw:
        req.raw_input_contents.append(codec.to_raw(arr))
    else:
        codec.fill_contents(inp.contents, arr)
    return req


def grid(b=2, c=1, h=8, w=8):
    return (np.arange(b * c * h * w, dtype=np.float32).reshape(b, c, h, w) % 251) / 250.0


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "contents"])
def test_fp32_nchw_in_and_out_unchanged(raw):
    x = grid()
    images, layout, datatype = v2.images_in(request_with(x, "FP32", raw), 0, SHAPE)
    np.testing.assert_array_equal(images, x)
    assert (layout, datatype) == ("NCHW", "FP32")
    np.testing.assert_array_equal(v2.images_out(images, layout, datatype), x)


def test_uint8_nhwc_comes_back_as_it_was_sent():
    x = grid(2, 3, 8, 8)
    nhwc = np.ascontiguousarray((x * 255).round().astype(np.uint8).transpose(0, 2, 3, 1))  # (2, 8, 8, 3)
    images, layout, datatype = v2.images_in(request_with(nhwc, "UINT8"), 0, (3, 8, 8))
    assert images.shape == (2, 3, 8, 8) and (layout, datatype) == ("NHWC", "UINT8")
    out = v2.images_out(images.astype(np.float32) / 255, layout, datatype)
    assert out.dtype == np.uint8 and out.shape == nhwc.shape
    np.testing.assert_array_equal(out, nhwc)


def test_layout_parameter_decides_and_3d_is_one_channel():
    x = grid(2, 1, 8, 8)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (2, 8, 8, 1)
    images, layout, _ = v2.images_in(request_with(nhwc, "FP32", layout="NHWC"), 0, SHAPE)
    assert layout == "NHWC"
    np.testing.assert_array_equal(images, x)
    images, layout, _ = v2.images_in(request_with(x[:, 0], "FP32"), 0, SHAPE)       # (B, H, W)
    assert layout == "NHW" and images.shape == (2, 1, 8, 8)
    assert v2.images_out(images, layout, "FP32").shape == (2, 8, 8)
    with pytest.raises(InvalidInputError, match="layout parameter"):
        v2.images_in(request_with(x, "FP32", layout="CHWN"), 0, SHAPE)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "contents"])
def test_png_files_decode_to_uint8_nchw_and_answer_in_fp32(raw):
    x = (grid() * 255).round().astype(np.uint8)
    images, layout, datatype = v2.images_in(request_with(codec.encode_pngs(x), "BYTES", raw), 0, SHAPE)
    np.testing.assert_array_equal(images, x)
    assert (layout, datatype) == ("NCHW", "FP32")


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(InvalidInputError, match="not supported for images"):
        v2.images_in(request_with(grid().astype(np.float64), "FP64"), 0, SHAPE)
    req = request_with(grid(), "FP32")
    req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    with pytest.raises(InvalidInputError, match="bytes of raw data"):
        v2.images_in(req, 0, SHAPE)
    with pytest.raises(InvalidInputError, match="not a decodable PNG"):
        v2.images_in(request_with([b"not a png"], "BYTES"), 0, SHAPE)
    # no files: the same "empty batch" as every other empty input, from validation
    images, _, _ = v2.images_in(request_with([], "BYTES"), 0, SHAPE)
    assert images.shape == (0, *SHAPE)


def test_replace_images_keeps_the_form_of_the_input():
    new = grid() * 0.5
    nhwc = np.ascontiguousarray(grid().transpose(0, 2, 3, 1))
    req = request_with(nhwc, "FP32", layout="NHWC")
    v2.replace_images(req, 0, new, "NHWC")
    got = codec.from_raw(req.raw_input_contents[0], np.dtype("<f4"), req.inputs[0].shape)
    np.testing.assert_array_equal(got, new.transpose(0, 2, 3, 1))
    files = request_with(codec.encode_pngs((grid() * 255).astype(np.uint8)), "BYTES", raw=False)
    v2.replace_images(files, 0, new, "NCHW")
    assert list(files.inputs[0].shape) == [2] and not files.raw_input_contents
    np.testing.assert_array_equal(codec.decode_images(list(files.inputs[0].contents.bytes_contents), SHAPE),
                                  codec.to_dtype(new, "UINT8"))


def test_image_index_named_only_or_by_shape():
    req = pb.ModelInferRequest()
    req.inputs.add(name="meta", datatype="INT64", shape=[2, 3])
    req.inputs.add(name="pixels", datatype="FP32", shape=[2, 8, 8, 1])
    assert v2.image_index(req, SHAPE) == 1
    req.parameters["purifier_input"].string_param = "meta"
    assert v2.image_index(req, SHAPE) == 0
    req.parameters["purifier_input"].string_param = "nope"
    with pytest.raises(InvalidInputError, match="not among the inputs"):
        v2.image_index(req, SHAPE)
    with pytest.raises(InvalidInputError, match="no inputs"):
        v2.image_index(pb.ModelInferRequest(), SHAPE)


def test_options_from_parameters():
    req = pb.ModelInferRequest()
    req.parameters["purifier_steps"].int64_param = 7
    req.parameters["purifier_restarts"].string_param = " 3"
    req.parameters["other"].string_param = "ignored"
    assert v2.options(req.parameters) == {"steps": 7, "restarts": 3}
    req.parameters["purifier_seed"].bool_param = True
    with pytest.raises(InvalidInputError, match="purifier_seed must be an integer"):
        v2.options(req.parameters)


def test_wanted_outputs_all_by_default_and_unknown_refused():
    req = pb.ModelInferRequest()
    assert v2.wanted_outputs(req, "m", ("a", "b")) == ["a", "b"]
    req.outputs.add(name="b")
    assert v2.wanted_outputs(req, "m", ("a", "b")) == ["b"]
    req.outputs.add(name="c")
    with pytest.raises(InvalidInputError, match=r"unknown outputs \['c'\]; model 'm' has \['a', 'b'\]"):
        v2.wanted_outputs(req, "m", ("a", "b"))


def test_outputs_travel_raw_with_their_datatypes():
    response = pb.ModelInferResponse()
    labels, errors = np.array([3, 1], np.int64), np.array([0.5, 0.25], np.float32)
    v2.add_outputs(response, {"label": labels, "error": errors, "flag": np.array([True, False])},
                   ["error", "label"])
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("error", "FP32", [2]), ("label", "INT64", [2])]
    arrays = v2.output_arrays(response)
    np.testing.assert_array_equal(arrays[0][2], errors)
    np.testing.assert_array_equal(arrays[1][2], labels)


@pytest.mark.parametrize("threshold", [0.05, None])
def test_annotate_puts_the_purification_in_parameters(threshold):
    p = Purified(np.zeros((2, *SHAPE), np.float32), np.array([0.0123456789, 0.2], np.float32),
                 np.array([False, True]), threshold, FAST.with_(steps=9))
    response = pb.ModelInferResponse()
    v2.annotate(response.parameters, p)
    got = v2.params(response.parameters)
    assert got["purifier_reconstruction_error"] == "0.0123457,0.2"
    assert got["purifier_adversarial"] == "0,1" and got["purifier_flagged"] == 1
    assert got["purifier_threshold_calibrated"] is (threshold is not None)
    assert got.get("purifier_threshold") == threshold
    assert (got["purifier_steps"], got["purifier_restarts"]) == (9, FAST.restarts)


def test_infer_request_and_input_spec():
    req = v2.infer_request("clf", "input", np.zeros((2, 8, 8, 1), np.uint8), "UINT8", "r1")
    assert (req.model_name, req.id, req.inputs[0].name, list(req.inputs[0].shape)) == ("clf", "r1", "input",
                                                                                        [2, 8, 8, 1])
    assert req.raw_input_contents[0] == bytes(128)
    T = pb.ModelMetadataResponse.TensorMetadata
    spec = v2.input_spec(pb.ModelMetadataResponse(inputs=[T(name="x", datatype="UINT8", shape=[-1, 8, 8, 1])]),
                         SHAPE)
    assert (spec.name, spec.datatype, spec.layout) == ("x", "UINT8", "NHWC")
    spec = v2.input_spec(pb.ModelMetadataResponse(inputs=[T(name="", datatype="FP16", shape=[-1, 1, 8, 8])]),
                         SHAPE)
    assert (spec.name, spec.datatype, spec.layout) == ("input", "FP32", "NCHW")
    assert v2.input_spec(pb.ModelMetadataResponse(), SHAPE) == v2.InputSpec()
