"""The deployment files agree with the CLI: every container command parses with the real
``purifier`` parser, and the ports they publish, probe and forward to are the ones the
parsed arguments name. No Docker engine or cluster runs here; this is what can be checked."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SIDECAR = ROOT / "deploy" / "kubernetes" / "sidecar-deployment.yaml"
SIDECAR_GPU = ROOT / "deploy" / "kubernetes" / "sidecar-deployment-gpu.yaml"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def parse(argv: list[str], environ: dict[str, str] | None = None):
    """The settings `purifier <argv>` would run with: the real parser, then the same settings
    builder and validation the command uses. The environment is `environ` only (not the
    test's), so defaults are the CLI's."""
    from purifier.cli import build_parser
    from purifier.settings import classifier_settings, serve_settings

    assert argv and argv[0] in ("serve", "serve-classifier"), argv
    try:
        args = build_parser(only=argv[0]).parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown or malformed flag
        raise AssertionError(f"`purifier {shlex.join(argv)}` does not parse") from exc
    build = serve_settings if argv[0] == "serve" else classifier_settings
    return build(args, environ=dict(environ or {}))


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def published(ports: list) -> set[int]:
    """Container-side ports of compose `ports:` entries like "8081:8081" or "127.0.0.1:1:2"."""
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in ports}


# --- docker-compose.yml + deploy/prometheus.yml ----------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_three_services_and_a_gpu_profile(compose):
    services = compose["services"]
    assert {n for n, svc in services.items() if not svc.get("profiles")} == {"classifier", "purifier", "prometheus"}
    assert {n for n, svc in services.items() if "gpu" in svc.get("profiles", [])} == {"purifier-gpu"}
    for name in ("classifier", "purifier", "purifier-gpu"):
        assert services[name]["build"]["context"] == "."


def test_compose_gpu_service_is_the_cuda_image_on_a_gpu(compose):
    cpu, gpu = compose["services"]["purifier"], compose["services"]["purifier-gpu"]
    purifier = parse(gpu["command"])
    assert purifier.device == "cuda"
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert gpu["image"] != cpu["image"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # both can run at once: no host port in common
    host = lambda svc: {str(p).rsplit(":", 1)[0] for p in svc["ports"]}  # noqa: E731
    assert not host(cpu) & host(gpu)
    assert host_port(purifier.downstream) == ("classifier", parse(compose["services"]["classifier"]["command"]).port)
    assert_real_settings(resolve_env(gpu["environment"]))


def test_compose_purifier_forwards_to_the_classifier_service(compose):
    classifier = parse(compose["services"]["classifier"]["command"])
    purifier = parse(compose["services"]["purifier"]["command"])
    assert host_port(purifier.downstream) == ("classifier", classifier.port)
    assert purifier.model_name == classifier.model_name  # what Classify forwards to
    assert classifier.host == "0.0.0.0" and purifier.host == "0.0.0.0"
    assert published(compose["services"]["classifier"]["ports"]) == {classifier.port}
    assert published(compose["services"]["purifier"]["ports"]) == {purifier.grpc_port, purifier.metrics_port}
    # compose's health checks ask the ports the servers really listen on
    assert compose["services"]["classifier"]["healthcheck"]["test"][-1] == f"localhost:{classifier.port}"
    assert compose["services"]["purifier"]["healthcheck"]["test"][-1] == f"localhost:{purifier.grpc_port}"
    # `docker compose stop` waits longer than purifier drains
    assert int(compose["services"]["purifier"]["stop_grace_period"].removesuffix("s")) > purifier.grace_seconds


def resolve_env(env: dict) -> dict[str, str]:
    """Compose's ${VAR:-default} -> default, as compose does when VAR is unset."""
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def assert_real_settings(env: dict[str, str]) -> None:
    """Each PURIFIER_* variable names a `purifier serve` flag and holds a valid value:
    one that named nothing would be silently ignored."""
    assert env
    for name, value in env.items():
        flag = "--" + name.removeprefix("PURIFIER_").lower().replace("_", "-")
        from_flag = parse(["serve", flag, value])
        from_env = parse(["serve"], environ={name: value})
        assert from_flag == from_env, f"{name}={value} does not act like {flag} {value}"


def test_compose_environment_names_real_settings(compose):
    """A PURIFIER_* variable that names no flag, or holds a bad value, must not slip through."""
    assert_real_settings(resolve_env(compose["services"]["purifier"]["environment"]))


def test_prometheus_scrapes_purifier_metrics_port(compose):
    expected = {f"{name}:{parse(compose['services'][name]['command']).metrics_port}"
                for name in ("purifier", "purifier-gpu")}
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == sorted(expected)
    volume = compose["services"]["prometheus"]["volumes"][0]
    assert (ROOT / volume.split(":")[0]).resolve() == PROMETHEUS


# --- Kubernetes sidecar Deployment ----------------------------------------------------------

@pytest.fixture(scope="module", params=[SIDECAR, SIDECAR_GPU], ids=["cpu", "gpu"])
def sidecar(request) -> tuple[dict, dict]:
    docs = {doc["kind"]: doc for doc in load_all(request.param)}
    assert set(docs) == {"Deployment", "Service"}
    return docs["Deployment"], docs["Service"]


def containers_by_name(pod_spec: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod_spec["containers"]}


def test_sidecar_forwards_to_the_model_server_over_localhost(sidecar):
    deployment, _ = sidecar
    containers = containers_by_name(deployment["spec"]["template"]["spec"])
    server = parse(containers["model-server"]["args"])
    purifier = parse(containers["purifier"]["args"])
    host, port = host_port(purifier.downstream)
    assert host in ("localhost", "127.0.0.1") and port == server.port
    assert purifier.model_name == server.model_name
    assert server.host == "127.0.0.1"  # reachable only through purifier


def test_sidecar_probes_use_native_grpc_on_the_serve_port(sidecar):
    deployment, _ = sidecar
    container = containers_by_name(deployment["spec"]["template"]["spec"])["purifier"]
    purifier = parse(container["args"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == purifier.grpc_port, probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": purifier.grpc_port, "metrics": purifier.metrics_port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(purifier.metrics_port)


def test_sidecar_has_requests_and_a_service(sidecar):
    deployment, service = sidecar
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    containers = containers_by_name(pod["spec"])
    for c in containers.values():
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], c["name"]
    named = {p["name"] for p in containers["purifier"]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
    purifier = parse(containers["purifier"]["args"])
    # the pod outlives purifier's drain
    assert pod["spec"]["terminationGracePeriodSeconds"] > purifier.grace_seconds
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_sidecar_environment_names_real_settings(sidecar):
    deployment, _ = sidecar
    container = containers_by_name(deployment["spec"]["template"]["spec"])["purifier"]
    assert_real_settings({e["name"]: e["value"] for e in container["env"]})


# --- KServe InferenceService ----------------------------------------------------------------

@pytest.fixture(scope="module")
def isvc() -> dict:
    (doc,) = load_all(KSERVE)
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    return doc


def kserve_transformer_args(isvc: dict, namespace: str = "default",
                            container_concurrency: int | None = None) -> list[str]:
    """The transformer's args as KServe runs them: what the manifest says, then what KServe's
    controller appends when absent (v1beta1 CustomTransformer.GetContainer): --model_name,
    --predictor_host <isvc>-predictor.<namespace>, --http_port 8080, and --workers N when
    containerConcurrency is set."""
    (container,) = isvc["spec"]["transformer"]["containers"]
    args, name = list(container["args"]), isvc["metadata"]["name"]
    appended = [("--model_name", name), ("--predictor_host", f"{name}-predictor.{namespace}"),
                ("--http_port", "8080")]
    if container_concurrency is not None:
        appended.append(("--workers", str(container_concurrency)))
    for flag, value in appended:
        if flag not in args:
            args += [flag, value]
    return args


def test_kserve_transformer_leaves_the_predictor_host_to_kserve(isvc):
    (container,) = isvc["spec"]["transformer"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert_real_settings(env)
    for flag in ("--predictor_host", "--predictor-host", "--downstream"):
        assert flag not in container["args"], f"{flag}: KServe passes the predictor host it routes"
    assert "PURIFIER_DOWNSTREAM" not in env


@pytest.mark.parametrize("namespace", ["default", "models"])
def test_kserve_transformer_forwards_where_kserve_says(isvc, namespace):
    """With the args KServe adds, purifier forwards to the predictor host KServe passes (port 80,
    the predictor Service's), under the InferenceService's name, and serves gRPC on the h2c port."""
    name = isvc["metadata"]["name"]
    purifier = parse(kserve_transformer_args(isvc, namespace))
    assert purifier.model_name == name
    assert host_port(purifier.downstream) == (f"{name}-predictor.{namespace}", 80)
    (container,) = isvc["spec"]["transformer"]["containers"]
    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == purifier.grpc_port
    assert purifier.host == "0.0.0.0"


def test_kserve_injected_flags_are_accepted_not_fatal(isvc):
    """--workers (containerConcurrency) and --protocol grpc-v2 (as KServe's docs write it) must
    not make the transformer exit with a usage error; purifier reports them as ignored."""
    from purifier.cli import build_parser
    from purifier.settings import kserve_ignored

    argv = kserve_transformer_args(isvc, container_concurrency=4) + [
        "--protocol", "grpc-v2", "--predictor_protocol=grpc-v2", "--enable_predictor_health_check",
        "--max_threads", "8"]
    purifier = parse(argv)
    assert purifier.model_name == isvc["metadata"]["name"]
    ignored = kserve_ignored(build_parser(only="serve").parse_args(argv))
    assert ignored == {"--workers": "4", "--protocol": "grpc-v2", "--predictor_protocol": "grpc-v2",
                       "--enable_predictor_health_check": "", "--max_threads": "8"}


def test_unknown_flags_that_are_not_kserves_still_fail():
    """Accepting KServe's flags must not let a typo in one of purifier's pass silently."""
    with pytest.raises(AssertionError, match="does not parse"):
        parse(["serve", "--max-batch-sise", "8"])


def test_serve_logs_the_kserve_flags_it_ignores(tmp_path):
    """The real command: it gets past argument parsing (here it stops at the empty model
    directory), logs the KServe flags, and warns when the protocol is not gRPC V2."""
    proc = subprocess.run(
        [sys.executable, "-m", "purifier.cli", "serve", "--protocol", "v1", "--workers", "2",
         "--model-dir", str(tmp_path), "--grpc-port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "unrecognized arguments" not in proc.stderr
    assert proc.returncode == 2 and "generator" in proc.stderr  # the model, not the flags
    logged = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    (ignored,) = [e for e in logged if e["msg"].startswith("ignoring KServe flags")]
    assert ignored["flags"] == {"--protocol": "v1", "--workers": "2"}
    assert any(e["level"] == "warning" and e["msg"].startswith("--protocol v1") for e in logged)


def pod_annotations(isvc: dict, component: str) -> dict[str, str]:
    """A component pod's annotations: the InferenceService's, then the component's own."""
    return {**isvc["metadata"].get("annotations", {}), **isvc["spec"][component].get("annotations", {})}


def aggregated_scrape(annotations: dict[str, str]) -> tuple[int, str] | None:
    """What KServe's metrics aggregator makes queue-proxy scrape from the kserve-container (and
    serve on 9088), as its pod mutator reads the pod's annotations; None when aggregation is off.
    Without prometheus.kserve.io/port it scrapes 8080, the KServe SDK's default."""
    if annotations.get("serving.kserve.io/enable-metric-aggregation") != "true":
        return None
    return (int(annotations.get("prometheus.kserve.io/port", "8080")),
            annotations.get("prometheus.kserve.io/path", "/metrics"))


def test_kserve_metric_aggregation_scrapes_purifiers_metrics(isvc):
    purifier = parse(kserve_transformer_args(isvc))
    annotations = pod_annotations(isvc, "transformer")
    assert aggregated_scrape(annotations) == (purifier.metrics_port, "/metrics")
    # and Prometheus is pointed at the aggregate (KServe sets the pod's prometheus.io/port to 9088)
    assert annotations.get("serving.kserve.io/enable-prometheus-scraping") == "true"
    # the predictor (serve-classifier) has no metrics port: aggregating there would scrape nothing
    assert aggregated_scrape(pod_annotations(isvc, "predictor")) is None


def test_kserve_predictor_serves_the_model_the_transformer_forwards(isvc):
    (container,) = isvc["spec"]["predictor"]["containers"]
    server = parse(container["args"])
    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == server.port
    assert server.model_name == isvc["metadata"]["name"]


def test_gpu_sidecar_runs_purifier_on_a_gpu():
    docs = {doc["kind"]: doc for doc in load_all(SIDECAR_GPU)}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = containers_by_name(pod)["purifier"]
    assert "--device" not in container["args"] or parse(container["args"]).device == "cuda"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["image"].endswith("-cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    # CPU and GPU Deployments can live in one namespace
    cpu = {doc["kind"]: doc for doc in load_all(SIDECAR)}
    for kind in ("Deployment", "Service"):
        assert docs[kind]["metadata"]["name"] != cpu[kind]["metadata"]["name"]
    assert docs["Service"]["spec"]["selector"] != cpu["Service"]["spec"]["selector"]


def test_every_model_dir_is_a_shipped_model(compose, sidecar, isvc):
    """The image copies models/ to /app/models and runs from /app, so a relative --model-dir
    in a manifest must name a model directory in this repo."""
    commands = [s["command"] for s in compose["services"].values() if "command" in s
                and s["command"][0].startswith("serve")]
    commands += [c["args"] for c in sidecar[0]["spec"]["template"]["spec"]["containers"]]
    commands += [c["args"] for part in ("predictor", "transformer") for c in isvc["spec"][part]["containers"]]
    dirs = {parse(argv).model_dir for argv in commands}
    assert dirs == {"models/fashion-mnist"}
    for d in dirs:
        assert (ROOT / d / "generator.safetensors").is_file() or (ROOT / d / "generator.pt2").is_file()
        assert (ROOT / d / "classifier.safetensors").is_file()


# --- Dockerfile -------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_exposes_the_cli_default_ports():
    serve, classifier = parse(["serve"]), parse(["serve-classifier"])
    exposed = {int(p.split("/")[0]) for word, rest in dockerfile_instructions() if word == "EXPOSE"
               for p in rest.split()}
    assert exposed == {serve.grpc_port, serve.metrics_port, classifier.port}


def test_dockerfile_entrypoint_user_and_default_command():
    import json

    ins = dict(dockerfile_instructions())  # last instruction of each kind wins, as in Docker
    assert json.loads(ins["ENTRYPOINT"]) == ["purifier"]
    env = dict(rest.split("=", 1) for word, rest in dockerfile_instructions()
               if word == "ENV" and rest.startswith("PURIFIER_"))
    served = parse(json.loads(ins["CMD"]), environ=env)
    assert served.host == "0.0.0.0"  # reachable from outside the container
    assert ins["USER"].split(":")[0] not in ("0", "root")
    # everything copied is made readable before switching to that user (a 0600 checkpoint
    # in the build context would otherwise be unreadable in the container)
    words = [w for w, _ in dockerfile_instructions()]
    last_copy, user = max(i for i, w in enumerate(words) if w == "COPY"), words.index("USER")
    assert any(w == "RUN" and "chmod -R a+rX /app" in r
               for w, r in dockerfile_instructions()[last_copy:user])
    # torch from the CPU (or CUDA) wheel index, at pyproject's pins
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert "--index-url" in runs and "torch==${TORCH_VERSION}" in runs
    args = dict(rest.split("=", 1) for word, rest in dockerfile_instructions() if word == "ARG" and "=" in rest)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    pins = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in pins
    assert f'"torchvision=={args["TORCHVISION_VERSION"]}"' in pins


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for word, rest in dockerfile_instructions():
        if word != "COPY":
            continue
        *sources, _dest = [a for a in rest.split() if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path"
            top = src.rstrip("/").split("/")[0]
            assert top not in ignored and src.rstrip("/") not in ignored, f"COPY {src} is in .dockerignore"


# --- scripts and examples ---------------------------------------------------------------------

def test_run_script_is_valid_bash():
    script = ROOT / "scripts" / "run.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_run_script_commands_parse_and_connect():
    """The main job's two commands: their flags exist, and purifier forwards to the classifier."""
    text = (ROOT / "scripts" / "run.sh").read_text()
    text = text.replace('"$MODEL_DIR"', "models/fashion-mnist").replace("$CLASSIFIER_PORT", "8001")
    commands = {}
    for line in text.splitlines():
        if line.startswith('"$PURIFIER" '):
            argv = shlex.split(line.removeprefix('"$PURIFIER" ').replace('"$@"', "").rstrip("& "))
            commands[argv[0]] = parse(argv)
    assert set(commands) == {"serve", "serve-classifier"}
    assert host_port(commands["serve"].downstream) == ("localhost", commands["serve-classifier"].port)


def test_healthcheck_reports_unhealthy_when_nothing_listens():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "healthcheck.py"),
                           f"127.0.0.1:{port}", "--timeout", "1"], capture_output=True, timeout=60)
    assert proc.returncode == 1


def test_example_client_help_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--purifier", "--classifier", "--model", "--eps"):
        assert flag in proc.stdout


def test_example_client_without_the_data_set_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    """A machine without Fashion-MNIST: a one-line error naming ways that work (the apt
    package, --data-dir, --download, which the client has), not a traceback."""
    import importlib.util

    from purifier import data

    pytest.importorskip("tritonclient.grpc")
    monkeypatch.setattr(data, "candidate_dirs", lambda name, data_dir=None: [tmp_path])
    spec = importlib.util.spec_from_file_location("example_client", ROOT / "examples" / "client.py")
    client = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "example_client", client)  # dataclasses look it up
    spec.loader.exec_module(client)
    with pytest.raises(SystemExit) as exc:
        client.main(["-n", "2"])
    message = str(exc.value.code)
    assert message.startswith("client.py: fashion-mnist test files")
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert "--download" in message
    assert client.parse_args(["--download"]).download  # the hint names a flag the client has
