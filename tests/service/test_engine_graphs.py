"""The engine's CUDA-graph path: off the GPU only its rules can be checked (CPU), on a GPU
the graphed answers must match the eager ones (marked gpu, skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from purifier import checkpoint
from purifier.errors import ModelLoadError
from purifier.engine import Engine, Limits
from purifier.settings import ServeSettings

from .conftest import images, make_model_dir


def test_bucket_is_next_power_of_two_capped_at_the_batch_limit(tmp_path):
    engine = Engine.load(make_model_dir(tmp_path), "cpu", "fast", Limits(max_batch_size=48))
    assert [engine.bucket(n) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    assert engine.graphs is False  # CPU: never graphed


def test_cuda_graphs_on_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="CUDA"):
        Engine.load(make_model_dir(tmp_path), "cpu", "fast", Limits(), cuda_graphs="on")


def test_cuda_graphs_setting_is_validated(tmp_path):
    from purifier.errors import ConfigError

    with pytest.raises(ConfigError, match="cuda-graphs"):
        ServeSettings(model_dir=str(tmp_path), cuda_graphs="sometimes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_engine_matches_eager_engine_on_gpu(tmp_path):
    model_dir = make_model_dir(tmp_path)
    graphed = Engine.load(model_dir, "cuda", "fast", Limits(max_batch_size=8), cuda_graphs="on")
    eager = Engine(checkpoint.load_bundle(model_dir, "cuda"), "cuda", graphed.default, Limits(max_batch_size=8),
                   cuda_graphs="off")
    graphed.warm_up()
    x = torch.from_numpy(images(5).astype(np.float32) / 255.0)
    cfg = graphed.config(seed=1)
    gi, ge = graphed.project(x, cfg)   # 5 images run in the 8-image bucket
    ei, ee = eager.project(x, cfg)
    assert gi.shape == ei.shape and ge.shape == (5,)
    np.testing.assert_allclose(ge, ee, rtol=0.1, atol=2e-3)
