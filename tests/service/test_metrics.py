"""Prometheus metrics: a ``model`` label where the request names one (bounded), process and
Python collectors, GPU memory on CUDA, names per Prometheus' conventions."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import generate_latest

from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.server.metrics import MAX_MODEL_LABELS, OTHER_MODEL, Metrics

from .conftest import Clients, images, running, running_classifier, settings_for, tensor, v2_request
from .test_rpcs import metric, scrape

# Metrics measured in something other than seconds or bytes, and what they count.
UNITLESS = {"purifier_batch_size": "images per batch", "purifier_reconstruction_error": "a mean squared error",
            "purifier_queue_depth": "requests", "purifier_model_ready": "1 or 0, as Prometheus' own up"}


@pytest.mark.integration
def test_requests_and_downstream_calls_carry_the_model_the_request_names(aloop, tiny_model_dir):
    with running_classifier(aloop, tiny_model_dir) as cls, \
            running(aloop, settings_for(tiny_model_dir, downstream=f"127.0.0.1:{cls.port}")) as server:
        clients = Clients(server.port)
        clients.v2.ModelInfer(v2_request(images(1), model="classifier", name="input"), timeout=30)
        clients.v2.ModelInfer(v2_request(images(1)), timeout=30)
        clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="classifier"), timeout=30)
        clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)
        clients.purifier.Classify(pb.ClassifyRequest(tensor=tensor(images(1)), model_name="classifier"), timeout=30)
        text = scrape(server)
        assert metric(text, "purifier_requests_total", method="ModelInfer", code="OK", model="classifier") == 1
        assert metric(text, "purifier_requests_total", method="ModelInfer", code="OK", model="purifier") == 1
        assert metric(text, "purifier_requests_total", method="ModelReady", code="OK", model="classifier") == 1
        assert metric(text, "purifier_requests_total", method="Purify", code="OK", model="") == 1
        assert metric(text, "purifier_requests_total", method="Classify", code="OK", model="classifier") == 1
        assert metric(text, "purifier_request_seconds_count", method="ModelInfer", model="classifier") == 1
        # two downstream inferences for classifier: the pass-through and Classify's
        assert metric(text, "purifier_downstream_seconds_count", method="ModelInfer", model="classifier") == 2
        # the process and Python collectors of prometheus_client
        assert metric(text, "process_cpu_seconds_total") > 0 and metric(text, "process_resident_memory_bytes") > 0
        assert "python_info{" in text and "python_gc_collections_total{" in text
        assert "purifier_cuda_memory" not in text                      # a CPU server has no GPU gauges
        clients.close()


def test_model_label_values_are_bounded():
    m = Metrics()
    names = [f"model-{i}" for i in range(MAX_MODEL_LABELS + 3)]
    labels = [m.model_label(n) for n in names]
    assert labels[:MAX_MODEL_LABELS] == names[:MAX_MODEL_LABELS]
    assert labels[MAX_MODEL_LABELS:] == [OTHER_MODEL] * 3
    assert m.model_label("model-0") == "model-0" and m.model_label("") == ""   # known names keep their label


def test_names_follow_prometheus_conventions():
    m = Metrics()
    m.rpc_done("ModelInfer", "OK", 0.01, "purifier")
    for family in m.registry.collect():
        if not family.name.startswith("purifier_"):
            continue
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        else:
            assert family.name.endswith(("_seconds", "_bytes")) or family.name in UNITLESS, \
                f"{family.name}: give it a base-unit suffix (_seconds, _bytes) or list it in UNITLESS"
        assert family.documentation, f"{family.name} has no description"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_in_use_on_cuda():
    m = Metrics(device="cuda:0")
    before = m.registry.get_sample_value("purifier_cuda_memory_allocated_bytes", {"device": "cuda:0"})
    x = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")          # 64 MiB
    after = m.registry.get_sample_value("purifier_cuda_memory_allocated_bytes", {"device": "cuda:0"})
    reserved = m.registry.get_sample_value("purifier_cuda_memory_reserved_bytes", {"device": "cuda:0"})
    assert after - before >= x.numel() and reserved >= after
    assert b"purifier_cuda_memory_allocated_bytes" in generate_latest(m.registry)
