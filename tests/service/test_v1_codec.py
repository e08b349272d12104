"""The purifier.v1 codec on its own: requests -> images and options, results -> responses."""

from __future__ import annotations

import numpy as np
import pytest

from purifier.errors import InvalidInputError
from purifier.projection import FAST
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.server import codec, v1, v2
from purifier.server.dataplane import Purified

from .conftest import tensor, to_array

SHAPE = (1, 8, 8)


def purified(n=2, threshold=0.05):
    return Purified(np.full((n, *SHAPE), 0.25, np.float32), np.array([0.01, 0.2][:n], np.float32),
                    np.array([False, True][:n]), threshold, FAST.with_(steps=5))


def test_images_and_options_from_a_request():
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    req = pb.PurifyRequest(tensor=tensor(x), options=pb.ProjectionOptions(steps=3, seed=0))
    np.testing.assert_array_equal(v1.images_of(req, SHAPE), x)
    assert v1.options_of(req) == {"steps": 3, "seed": 0}                # unset fields stay the server's
    files = (x * 255).astype(np.uint8)
    req = pb.PurifyRequest(encoded=pb.EncodedImages(images=codec.encode_pngs(files)))
    np.testing.assert_array_equal(v1.images_of(req, SHAPE), files)
    with pytest.raises(InvalidInputError, match="no images"):
        v1.images_of(pb.PurifyRequest(), SHAPE)
    with pytest.raises(InvalidInputError, match="FLOAT32 .* or UINT8"):
        v1.images_of(pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.INT64, shape=[1], data=bytes(8))), SHAPE)


@pytest.mark.parametrize("threshold", [0.05, None])
def test_purify_response_carries_the_purification(threshold):
    r = v1.purify_response(purified(threshold=threshold), "rid")
    assert r.request_id == "rid"
    np.testing.assert_array_equal(to_array(r.purification.images), purified().images)
    assert list(r.purification.adversarial) == [False, True]
    assert r.purification.threshold_calibrated is (threshold is not None)
    assert (r.purification.steps, r.purification.restarts) == (5, FAST.restarts)


def test_classify_response_keeps_typed_outputs_and_labels_the_logits():
    answer = v2_pb.ModelInferResponse(model_name="")
    v2.add_outputs(answer, {"logits": np.array([[0.1, 0.9], [0.8, 0.2]], np.float32),
                            "name": np.array([1, 2], np.int64)}, ["logits", "name"])
    answer.outputs.add(name="text", datatype="BYTES", shape=[1])
    answer.raw_output_contents.append(codec.join_bytes_elements([b"x"]))
    r = v1.classify_response(purified(), answer, "rid", "clf")
    assert r.model_name == "clf" and list(r.labels) == [1, 0]
    assert [o.name for o in r.outputs] == ["logits", "name"]            # BYTES has no v1 dtype
    np.testing.assert_array_equal(to_array(r.outputs[1].tensor), [1, 2])
