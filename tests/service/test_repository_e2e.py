"""The user's path, end to end on the CPU (issue 14): a folder of RGB images the test draws
itself (coloured shapes, 32x32) -> `purifier train-gan --data` for a few iterations ->
`purifier calibrate --data` -> one purifier serving that model beside the shipped
Fashion-MNIST model -> purified answers for both model names through the V2 pass-through,
each from its own generator: the shapes the downstream receives, and the reconstruction
errors, which equal those of each model's own engine run in this process with the same seed."""

from __future__ import annotations

import json
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from purifier import checkpoint
from purifier.cli import main as cli
from purifier.engine import Engine
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc

from .conftest import Clients, running, settings_for, v2_request
from .test_repository import AnyModel

ROOT = Path(__file__).resolve().parents[2]
FASHION = ROOT / "models" / "fashion-mnist"
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
SEED = 7


def draw_shapes(folder: Path, n: int = 48, size: int = 32) -> None:
    """n PNGs in two class folders: a filled square or disc of a random colour on a dark
    background, at a random place and size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        kind = ("square", "disc")[i % 2]
        img = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 40, 3, dtype=np.uint8)
        r = int(rng.integers(5, 11))
        cy, cx = rng.integers(r, size - r, 2)
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r) if kind == "square" \
            else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[mask] = rng.integers(80, 256, 3, dtype=np.uint8)
        (folder / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / kind / f"{i:03d}.png")


def load_pngs(folder: Path, n: int) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.rglob("*.png"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).transpose(0, 3, 1, 2).copy()


def fashion_test_images(n: int) -> np.ndarray:
    from purifier.data import read_idx

    return read_idx(FASHION_TEST)[:n, None].copy()       # (n, 1, 28, 28) uint8


def errors_of(response) -> np.ndarray:
    return np.array([float(v) for v in response.parameters["purifier_reconstruction_error"].string_param.split(",")])


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not (FASHION / "generator.safetensors").exists() or not FASHION_TEST.exists(),
                    reason="needs the shipped models/fashion-mnist and the Fashion-MNIST test set")
def test_folder_to_trained_calibrated_model_served_beside_fashion_mnist(aloop, tmp_path):
    data, model = tmp_path / "shapes", tmp_path / "shapes-model"
    draw_shapes(data)
    assert cli(["train-gan", "--data", str(data), "--out", str(model), "--run-dir", str(tmp_path / "run"),
                "--iterations", "3", "--batch-size", "8", "--n-critic", "1", "--select-images", "8",
                "--checkpoint-every", "1000", "--sample-every", "1000", "--log-every", "1",
                "--device", "cpu", "--no-progress"]) == 0
    assert cli(["calibrate", str(model), "--data", str(data), "--projection", "fast", "--n", "16",
                "--heldout-n", "8", "--holdout", "24", "--device", "cpu", "--no-progress"]) == 0
    card = checkpoint.read_card(model)
    threshold = card["detection"]["threshold"]

    repo = tmp_path / "models.json"
    repo.write_text(json.dumps({"default": "fashion-mnist", "models": {
        "fashion-mnist": {"dir": str(FASHION)}, "shapes": {"dir": str(model)}}}))
    downstream = AnyModel()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(downstream, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        settings = settings_for("", model_config=str(repo), downstream=f"127.0.0.1:{port}", max_steps=1000)
        with running(aloop, settings) as server:
            clients = Clients(server.port)
            shapes_x, fashion_x = load_pngs(data, 2), fashion_test_images(2)      # uint8 NCHW
            answers = {}
            for name, x in (("shapes", shapes_x), ("fashion-mnist", fashion_x)):
                assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name=name), timeout=30).ready
                answers[name] = clients.v2.ModelInfer(v2_request(x, model=name, name="input", purifier_seed=SEED),
                                                      timeout=300)
            clients.close()
    finally:
        grpc_server.stop(0)

    sent = {r.model_name: (tuple(r.inputs[0].shape), r.inputs[0].datatype) for r in downstream.seen}
    assert sent == {"shapes": ((2, 3, 32, 32), "UINT8"), "fashion-mnist": ((2, 1, 28, 28), "UINT8")}
    assert answers["shapes"].parameters["purifier_model"].string_param == "shapes"
    assert answers["fashion-mnist"].parameters["purifier_model"].string_param == "fashion-mnist"
    assert answers["shapes"].parameters["purifier_threshold"].double_param == pytest.approx(threshold)
    # Each model's errors are those of its own generator: the same seeded projection in this process.
    for name, mdir, x in (("shapes", model, shapes_x), ("fashion-mnist", FASHION, fashion_x)):
        engine = Engine.load(mdir, "cpu", "fast")
        _, expected = engine.project(engine.validate(x), engine.config(seed=SEED))
        got = errors_of(answers[name])
        np.testing.assert_allclose(got, expected, rtol=1e-3, err_msg=name)
