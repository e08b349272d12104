"""Wire compatibility with software we did not write: tritonclient[grpc] as the client of
purifier, and MLServer 1.7.1 (a real V2 server, custom runtime) as purifier's downstream."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc
from purifier.proto.purifier.v1 import purifier_pb2 as pb

from .conftest import Clients, images, running, running_classifier, settings_for, tensor, to_array
from .test_downstream import classify_locally, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def triton():
    return pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the test extra")


def test_tritonclient_ready_checks_metadata_and_infer(triton, server):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("purifier")
    assert client.get_server_metadata().name == "purifier"
    meta = client.get_model_metadata("purifier")
    assert meta.inputs[0].name == "images" and list(meta.inputs[0].shape) == [-1, 1, 8, 8]

    x = images(3)
    inp = triton.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outputs = [triton.InferRequestedOutput(n) for n in ("purified", "reconstruction_error", "adversarial")]
    result = client.infer("purifier", [inp], outputs=outputs, request_id="t-1",
                          parameters={"purifier_steps": 20, "purifier_restarts": 2})
    purified, errors = result.as_numpy("purified"), result.as_numpy("reconstruction_error")
    assert purified.shape == x.shape and errors.shape == (3,)
    np.testing.assert_allclose(errors, ((purified - x) ** 2).reshape(3, -1).mean(1), rtol=1e-4, atol=1e-7)
    assert result.as_numpy("adversarial").dtype == np.bool_
    response = result.get_response()
    assert response.id == "t-1" and response.parameters["purifier_steps"].int64_param == 20

    x8 = (x * 255).round().astype(np.uint8).transpose(0, 2, 3, 1).copy()   # UINT8 NHWC
    inp8 = triton.InferInput("images", list(x8.shape), "UINT8")
    inp8.set_data_from_numpy(x8)
    assert client.infer("purifier", [inp8]).as_numpy("purified").shape == (3, 8, 8, 1)

    with pytest.raises(triton.InferenceServerException) as e:
        client.infer("no-such-model", [inp])
    assert "NOT_FOUND" in str(e.value.status())
    client.close()


def test_tritonclient_through_purifier_to_the_reference_classifier(triton, aloop, tiny_model_dir):
    with running_classifier(aloop, tiny_model_dir) as cls, \
            running(aloop, settings_for(tiny_model_dir, downstream=f"127.0.0.1:{cls.port}")) as server:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        assert client.is_model_ready("classifier")
        x = images(2)
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("classifier", [inp], parameters={"purifier_seed": 11, "purifier_steps": 8})
        assert result.as_numpy("label").shape == (2,)
        params = result.get_response().parameters
        assert len(params["purifier_reconstruction_error"].string_param.split(",")) == 2
        client.close()


RUNTIME = '''
import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from purifier import checkpoint


class ClassifierRuntime(MLModel):
    """Serves a purifier model directory's classifier; written against MLServer's API only."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        self.classifier = checkpoint.load_module(f"{uri}/classifier.safetensors", "classifier")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        with torch.no_grad():
            logits = self.classifier(torch.from_numpy(x)).numpy()
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("logits", logits)])
'''


@pytest.fixture
def mlserver(tmp_path, tiny_model_dir):
    # find_spec, not import: mlserver registers inference.* in the default descriptor pool, as
    # tritonclient (imported by the tests above) does, and the two cannot share a process.
    if importlib.util.find_spec("mlserver") is None:
        pytest.skip("mlserver==1.7.1 (the test extra) is not installed; it is the V2 server we forward to")
    grpc_port = free_port()
    folder = tmp_path / "mlserver"
    (folder / "classifier").mkdir(parents=True)
    # parallel_workers 0: MLServer's worker pool crashes at start with the installed uvloop.
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": free_port(), "grpc_port": grpc_port, "metrics_port": free_port(),
        "parallel_workers": 0, "debug": False}))
    (folder / "classifier" / "model-settings.json").write_text(json.dumps({
        "name": "classifier", "implementation": "runtime.ClassifierRuntime",
        "parameters": {"uri": str(tiny_model_dir)}}))
    (folder / "classifier" / "runtime.py").write_text(textwrap.dedent(RUNTIME))
    log = open(tmp_path / "mlserver.log", "w+")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(folder / "classifier")]))
    proc = subprocess.Popen([sys.executable, "-c", "from mlserver.cli.main import main; main()", "start", str(folder)],
                            cwd=folder, env=env, stdout=log, stderr=log)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while True:
            try:
                if stub.ModelReady(v2_pb.ModelReadyRequest(name="classifier"), timeout=2).ready:
                    break
            except grpc.RpcError:
                pass
            assert proc.poll() is None, "MLServer exited:\n" + (tmp_path / "mlserver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "MLServer not ready:\n" + (tmp_path / "mlserver.log").read_text()[-3000:]
            time.sleep(0.5)
        channel.close()
        yield f"127.0.0.1:{grpc_port}"
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


@pytest.mark.slow
def test_purifier_forwards_to_a_real_mlserver(mlserver, aloop, tiny_model_dir):
    with running(aloop, settings_for(tiny_model_dir, downstream=mlserver)) as server:
        clients = Clients(server.port)
        x = images(2)
        r = clients.purifier.Classify(pb.ClassifyRequest(tensor=tensor(x)), timeout=60)
        logits = {o.name: to_array(o.tensor) for o in r.outputs}["logits"]
        np.testing.assert_allclose(logits, classify_locally(to_array(r.purification.images)), rtol=1e-4, atol=1e-5)
        assert list(r.labels) == logits.argmax(1).tolist()

        # V2 pass-through, as a Triton/KServe client would call it
        req = v2_pb.ModelInferRequest(model_name="classifier", id="via-mlserver")
        req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        resp = clients.v2.ModelInfer(req, timeout=60)
        assert resp.id == "via-mlserver" and resp.raw_output_contents
        out = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(tuple(resp.outputs[0].shape))
        assert out.shape == (2, 10)
        assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="classifier")).ready
        with pytest.raises(grpc.RpcError) as e:
            clients.v2.ModelInfer(v2_pb.ModelInferRequest(model_name="missing", inputs=req.inputs,
                                                          raw_input_contents=req.raw_input_contents), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        clients.close()
