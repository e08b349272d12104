"""Triton's ModelConfig and ModelStatistics extensions, read with tritonclient[grpc] (Triton
tooling's own client): model ``purifier`` describes itself and counts its work; other models'
answers come from the downstream unchanged, fields purifier does not declare included."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from purifier.projection import FAST
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc

from .conftest import images, running, running_classifier, settings_for

pytestmark = pytest.mark.integration


@pytest.fixture
def triton():
    return pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the test extra")


def infer(triton, client, x, model="purifier", name="images"):
    inp = triton.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], parameters={"purifier_steps": 5, "purifier_restarts": 2})


def test_model_config_of_purifier(triton, server):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    config = client.get_model_config("purifier").config
    assert config.name == "purifier" and config.max_batch_size == 16           # settings_for's limit
    assert [(i.name, list(i.dims)) for i in config.input] == [("images", [1, 8, 8])]
    assert config.input[0].data_type == triton.model_config_pb2.TYPE_FP32
    assert config.input[0].format == triton.model_config_pb2.ModelInput.FORMAT_NCHW
    assert [o.name for o in config.output] == ["purified", "reconstruction_error", "adversarial"]
    assert config.output[2].data_type == triton.model_config_pb2.TYPE_BOOL
    assert config.output[1].HasField("reshape") and list(config.output[1].reshape.shape) == []   # [B]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000                 # 5 ms
    assert config.instance_group[0].kind == triton.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["steps"].string_value == str(FAST.steps)        # the server's default preset
    as_json = client.get_model_config("purifier", as_json=True)
    assert as_json["config"]["max_batch_size"] == 16
    client.close()


def test_model_statistics_of_purifier_count_requests_batches_and_failures(triton, server):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    before = client.get_inference_statistics("purifier").model_stats[0]
    assert before.name == "purifier" and before.inference_count == 0 and before.last_inference == 0
    infer(triton, client, images(3))
    infer(triton, client, images(2, seed=1))
    with pytest.raises(triton.InferenceServerException):     # outside [0, 1]: refused by validation
        infer(triton, client, images(1) + 5)
    stats = client.get_inference_statistics("purifier").model_stats[0]
    s = stats.inference_stats
    assert (s.success.count, s.fail.count) == (2, 1)
    assert stats.inference_count == 5                         # images, not requests
    assert s.queue.count == 2 and s.compute_infer.count == 2  # per request that reached compute
    assert 1 <= stats.execution_count <= 2
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == 5
    # durations are real: success covers at least the queue wait and the compute of each request
    assert s.success.ns >= s.queue.ns + s.compute_infer.ns > 0
    assert stats.last_inference > 0
    # no name: every model; without a downstream that is purifier alone
    assert [m.name for m in client.get_inference_statistics().model_stats] == ["purifier"]
    client.close()


class TritonLikeDownstream(v2_grpc.GRPCInferenceServiceServicer):
    """Answers ModelConfig and ModelStatistics as Triton would, with fields purifier's proto
    does not declare (built with tritonclient's full messages, re-read as purifier's)."""

    def __init__(self, triton):
        self.triton = triton

    def ServerReady(self, request, context):
        return v2_pb.ServerReadyResponse(ready=True)

    def ModelConfig(self, request, context):
        if request.name != "scorer":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name}")
        full = self.triton.service_pb2.ModelConfigResponse()
        full.config.name = "scorer"
        full.config.max_batch_size = 7
        full.config.version_policy.latest.num_versions = 2                  # not in purifier's subset
        full.config.sequence_batching.max_sequence_idle_microseconds = 99   # nor this
        return v2_pb.ModelConfigResponse.FromString(full.SerializeToString())

    def ModelStatistics(self, request, context):
        full = self.triton.service_pb2.ModelStatisticsResponse()
        m = full.model_stats.add(name="scorer", version="3", inference_count=11, execution_count=4)
        m.inference_stats.success.count = 11
        m.memory_usage.add(type="GPU", id=0, byte_size=1234)
        m.response_stats["0"].success.count = 5                           # not in purifier's subset
        return v2_pb.ModelStatisticsResponse.FromString(full.SerializeToString())


@pytest.fixture
def triton_downstream(triton, aloop, tiny_model_dir):
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(TritonLikeDownstream(triton), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with running(aloop, settings_for(tiny_model_dir, downstream=f"127.0.0.1:{port}")) as server:
            client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
            yield client
            client.close()
    finally:
        grpc_server.stop(0)


def test_pass_through_config_and_statistics_are_the_downstreams(triton, triton_downstream):
    client = triton_downstream
    config = client.get_model_config("scorer").config
    assert config.max_batch_size == 7
    assert config.version_policy.latest.num_versions == 2
    assert config.sequence_batching.max_sequence_idle_microseconds == 99
    stats = client.get_inference_statistics("scorer").model_stats
    assert [(m.name, m.version, m.inference_count) for m in stats] == [("scorer", "3", 11)]
    assert stats[0].memory_usage[0].byte_size == 1234 and stats[0].response_stats["0"].success.count == 5
    # no name: purifier's own, then the downstream's
    assert [m.name for m in client.get_inference_statistics().model_stats] == ["purifier", "scorer"]
    with pytest.raises(triton.InferenceServerException) as e:
        client.get_model_config("nope")
    assert "NOT_FOUND" in str(e.value.status())


def test_pass_through_to_a_server_without_the_extensions_is_unimplemented(triton, aloop, tiny_model_dir):
    # the reference classifier, like MLServer and KServe's model server, serves only the core V2 RPCs
    with running_classifier(aloop, tiny_model_dir) as cls, \
            running(aloop, settings_for(tiny_model_dir, downstream=f"127.0.0.1:{cls.port}")) as server:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        for call in (client.get_model_config, client.get_inference_statistics):
            with pytest.raises(triton.InferenceServerException) as e:
                call("classifier")
            assert "UNIMPLEMENTED" in str(e.value.status())
        # purifier's own statistics still answer when the downstream has none to add
        x = images(2)
        infer(triton, client, x, model="classifier", name="input")
        stats = client.get_inference_statistics().model_stats
        assert [m.name for m in stats] == ["purifier"] and stats[0].inference_count == 2
        assert stats[0].inference_stats.success.count == 1
        client.close()
