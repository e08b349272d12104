"""TLS and mutual TLS with certificates made by the openssl command line."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.proto.purifier.v1 import purifier_pb2_grpc

from .conftest import images, running, settings_for, tensor

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def purify(port, creds):
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        return purifier_pb2_grpc.PurifierStub(channel).Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)


def test_tls(aloop, tiny_model_dir, pki):
    s = settings_for(tiny_model_dir, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    with running(aloop, s) as server:
        r = purify(server.port, grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes()))
        assert len(r.purification.reconstruction_error) == 1


def test_mutual_tls_requires_a_client_certificate(aloop, tiny_model_dir, pki):
    s = settings_for(tiny_model_dir, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                     tls_client_ca=str(pki / "ca.pem"))
    with running(aloop, s) as server:
        ca = (pki / "ca.pem").read_bytes()
        with pytest.raises(grpc.RpcError) as e:
            purify(server.port, grpc.ssl_channel_credentials(ca))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes())
        assert len(purify(server.port, creds).purification.reconstruction_error) == 1


def test_rest_follows_the_same_tls_and_mtls(aloop, tiny_model_dir, pki):
    import ssl
    import urllib.error
    import urllib.request

    s = settings_for(tiny_model_dir, http_port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                     tls_client_ca=str(pki / "ca.pem"))
    with running(aloop, s) as server:
        url = f"https://localhost:{server.http_port}/v2/health/ready"
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, context=anonymous, timeout=30).read()
        known = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        known.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        with urllib.request.urlopen(url, context=known, timeout=30) as r:
            assert r.status == 200 and r.read() == b'{"ready":true}'
