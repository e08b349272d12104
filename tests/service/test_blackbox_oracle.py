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
    oracle = RemoteLabels(f"127.0.0.1:{pur_port}", "classifier", batch_size=8)
    try:
        labels = oracle(torch.rand(10, 1, 8, 8))
    finally:
        oracle.close()
    assert labels.shape == (10,) and int(labels.min()) >= 0 and int(labels.max()) < 10
    assert oracle.queries == 10


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
