"""The black box over the wire (purifier.server.oracle.RemoteLabels): labels from a served
classifier, directly and through a running purifier, as `purifier eval --blackbox-oracle` asks."""

from __future__ import annotations

import pytest
import torch

from purifier import checkpoint
from purifier.errors import ConfigError
from purifier.server.oracle import RemoteLabels

from .conftest import make_model_dir, running, running_classifier, settings_for


@pytest.fixture(scope="module")
def stack(aloop, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("oracle"))
    with running_classifier(aloop, model_dir) as clf:
        with running(aloop, settings_for(model_dir, downstream=f"127.0.0.1:{clf.port}")) as pur:
            yield model_dir, clf.port, pur.port


def test_remote_labels_are_the_served_classifiers_answers(stack):
    model_dir, clf_port, _ = stack
    local = checkpoint.load_bundle(model_dir, need_classifier=True).classifier
    x = torch.rand(37, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    oracle = RemoteLabels(f"127.0.0.1:{clf_port}", "classifier", batch_size=16)
    try:
        labels = oracle(x)
    finally:
        oracle.close()
    with torch.no_grad():
        want = local(x).argmax(1)
    assert labels.dtype == torch.int64 and torch.equal(labels, want)
    assert oracle.queries == 37 and oracle.output_name == "label"


def test_remote_labels_through_a_running_purifier(stack):
    _, _, pur_port = stack
    oracle = RemoteLabels(f"127.0.0.1:{pur_port}", "classifier", batch_size=16)  # settings_for's max batch
    try:
        labels = oracle(torch.rand(40, 1, 8, 8))
    finally:
        oracle.close()
    assert labels.shape == (40,) and int(labels.min()) >= 0 and int(labels.max()) < 10
    assert oracle.queries == 40


def test_a_pass_through_models_config_through_purifier_says_purifiers_batch_limit(aloop, tmp_path):
    """A client (RemoteLabels, tritonclient) that sizes requests by ModelConfig must not be
    refused for it: through purifier, max_batch_size is at most purifier's own."""
    import grpc

    from purifier.proto.inference import grpc_service_pb2 as pb
    from purifier.proto.inference import grpc_service_pb2_grpc as pb_grpc
    from purifier.proto.inference import model_config_pb2 as mc

    class WithConfig(pb_grpc.GRPCInferenceServiceServicer):
        def ModelMetadata(self, request, context):
            T = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(name=request.name, inputs=[T(name="input", datatype="FP32")],
                                            outputs=[T(name="label", datatype="INT64")])

        def ModelConfig(self, request, context):
            return pb.ModelConfigResponse(config=mc.ModelConfig(name=request.name, max_batch_size=1000))

        def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return pb.ServerReadyResponse(ready=True)

    from concurrent.futures import ThreadPoolExecutor
    downstream = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(WithConfig(), downstream)
    port = downstream.add_insecure_port("127.0.0.1:0")
    downstream.start()
    try:
        model_dir = make_model_dir(tmp_path)
        with running(aloop, settings_for(model_dir, downstream=f"127.0.0.1:{port}")) as pur:
            oracle = RemoteLabels(f"127.0.0.1:{pur.port}", "classifier", batch_size=500)
            try:
                assert oracle.batch_size == 16             # purifier's limit, not the downstream's 1000
            finally:
                oracle.close()
    finally:
        downstream.stop(0)


def test_remote_labels_say_what_the_server_answered(stack):
    _, clf_port, _ = stack
    with pytest.raises(ConfigError, match=r"oracle 127\.0\.0\.1:\d+ model 'nope': ModelMetadata answered NOT_FOUND"):
        RemoteLabels(f"127.0.0.1:{clf_port}", "nope")
    oracle = RemoteLabels(f"127.0.0.1:{clf_port}", "classifier")
    try:
        with pytest.raises(ConfigError, match="INVALID_ARGUMENT"):
            oracle(torch.rand(2, 1, 9, 9))                                 # not the served model's shape
        with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
            oracle(torch.rand(2, 8, 8))
    finally:
        oracle.close()
