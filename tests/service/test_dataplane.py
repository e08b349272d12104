"""The data plane on the CPU, without a server: a real engine and batcher on the tiny model,
and a stand-in downstream that records what it is sent."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from purifier.engine import Batcher, Engine, Limits, Repository
from purifier.errors import InvalidInputError, NotFoundError
from purifier.proto.inference import grpc_service_pb2 as pb
from purifier.server import codec, v2
from purifier.server.dataplane import DataPlane
from purifier.server.metrics import Metrics

from .conftest import images


class FakeDownstream:
    """Answers every model with two logits per image, in typed contents (as some servers do)."""

    def __init__(self, inputs=()):
        self.meta = pb.ModelMetadataResponse(inputs=list(inputs))
        self.requests: list[pb.ModelInferRequest] = []

    async def model_metadata(self, model, version="", deadline=None):
        return self.meta

    async def infer(self, request, deadline=None):
        self.requests.append(request)
        n = request.inputs[0].shape[0]
        response = pb.ModelInferResponse(model_name=request.model_name)
        out = response.outputs.add(name="logits", datatype="FP32", shape=[n, 2])
        out.contents.fp32_contents.extend([0.0, 1.0] * n)
        return response


def with_plane(model_dir, fn, downstream=None, **limits):
    """Run ``await fn(plane)`` with a plane built as the server builds it."""
    async def main():
        engine = Engine.load(model_dir, "cpu", "fast", Limits(**{"max_batch_size": 8, **limits}))
        metrics = Metrics()
        batcher = Batcher(engine.project, ThreadPoolExecutor(1), max_batch_size=8, max_queue_delay_s=0.0,
                          max_queue_size=8, metrics=metrics.for_model("default"))
        batcher.start()
        try:
            return await fn(DataPlane(Repository.single(engine, batcher, metrics=metrics.for_model("default")),
                                       downstream, metrics, "clf")), metrics
        finally:
            await batcher.close()
    return asyncio.run(main())


def counter(metrics, name, model="default"):
    return metrics.registry.get_sample_value(name, {"model": model})


def test_purify_answers_flags_and_counts(tiny_model_dir):
    x = images(3)

    async def go(plane):
        return await plane.purify(x, {"steps": 4, "seed": 0})
    p, metrics = with_plane(tiny_model_dir, go)
    assert p.images.shape == x.shape and p.images.dtype == np.float32 and p.errors.shape == (3,)
    assert p.threshold == 0.05 and (p.flags == (p.errors > 0.05)).all()
    assert (p.cfg.steps, p.cfg.seed) == (4, 0)
    assert counter(metrics, "purifier_images_total") == 3
    assert counter(metrics, "purifier_flagged_total") == int(p.flags.sum())
    assert counter(metrics, "purifier_batch_size_count") == 1          # the batcher timed one batch


def test_purify_refuses_options_beyond_the_limits_before_queueing(tiny_model_dir):
    async def go(plane):
        with pytest.raises(InvalidInputError, match="above this server's limit of 5"):
            await plane.purify(images(1), {"steps": 6})
        with pytest.raises(InvalidInputError, match="empty batch"):
            await plane.purify(np.zeros((0, 1, 8, 8), np.float32))
    _, metrics = with_plane(tiny_model_dir, go, max_steps=5)
    assert not counter(metrics, "purifier_batch_size_count")


def test_classify_sends_the_purified_images_as_the_downstream_wants_them(tiny_model_dir):
    T = pb.ModelMetadataResponse.TensorMetadata
    down = FakeDownstream([T(name="pixels", datatype="UINT8", shape=[-1, 8, 8, 1])])

    async def go(plane):
        return await plane.classify(images(2), {"steps": 2, "seed": 1}, "", None, "rid")
    (purified, answer), _ = with_plane(tiny_model_dir, go, down)
    sent = down.requests[0]
    assert (sent.model_name, sent.id, sent.inputs[0].name, sent.inputs[0].datatype) == ("clf", "rid", "pixels",
                                                                                         "UINT8")
    got = codec.from_raw(sent.raw_input_contents[0], np.dtype("u1"), sent.inputs[0].shape)
    np.testing.assert_array_equal(got, v2.images_out(purified.images, "NHWC", "UINT8"))
    assert answer.raw_output_contents and not answer.outputs[0].HasField("contents")   # moved to raw
    np.testing.assert_array_equal(v2.output_arrays(answer)[0][2], [[0.0, 1.0]] * 2)


def test_pass_through_purifies_the_image_input_and_forwards_the_rest(tiny_model_dir):
    down = FakeDownstream()
    x = images(2)
    request = pb.ModelInferRequest(model_name="other", id="r9")
    request.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
    request.inputs.add(name="extra", datatype="INT64", shape=[2])
    request.raw_input_contents.extend([codec.to_raw(x), codec.to_raw(np.array([4, 5], np.int64))])
    request.parameters["purifier_steps"].int64_param = 3
    request.parameters["purifier_seed"].int64_param = 0
    request.parameters["keep_me"].string_param = "yes"

    async def go(plane):
        return await plane.pass_through(request)
    (purified, answer), _ = with_plane(tiny_model_dir, go, down)
    sent = down.requests[0]
    assert set(sent.parameters) == {"keep_me"}                    # purifier's own parameters stay here
    assert purified.cfg.steps == 3
    np.testing.assert_array_equal(codec.from_raw(sent.raw_input_contents[0], np.dtype("<f4"), x.shape),
                                  purified.images)
    assert sent.raw_input_contents[1] == request.raw_input_contents[1]
    assert answer.raw_output_contents


def test_without_a_downstream_other_models_are_not_found(tiny_model_dir):
    async def go(plane):
        with pytest.raises(NotFoundError, match="no downstream"):
            await plane.classify(images(1), None, "clf")
        with pytest.raises(NotFoundError, match="unknown model 'x'"):
            await plane.pass_through(pb.ModelInferRequest(model_name="x"))
    with_plane(tiny_model_dir, go)
