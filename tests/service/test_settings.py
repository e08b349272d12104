"""Settings: flags, PURIFIER_* variables, KServe's spellings, defaults and fix-it messages."""

from __future__ import annotations

import argparse

import pytest

from purifier.cli import build_parser
from purifier.errors import ConfigError
from purifier.settings import ServeSettings, classifier_settings, serve_settings


def parse(argv, command="serve"):
    return build_parser(only=command).parse_args([command, *argv])


def test_defaults_follow_the_port_contract():
    s = serve_settings(parse([]), environ={})
    assert (s.grpc_port, s.metrics_port, s.downstream) == (8081, 8082, "localhost:8001")
    assert s.model_dir.endswith("models/fashion-mnist") and s.projection == "fast"
    c = classifier_settings(parse([], "serve-classifier"), environ={})
    assert (c.port, c.model_name) == (8001, "classifier")


def test_flag_beats_environment_beats_default():
    env = {"PURIFIER_MAX_BATCH_SIZE": "8", "PURIFIER_PROJECTION": "fast", "PURIFIER_GRPC_PORT": "9000"}
    s = serve_settings(parse(["--grpc-port", "9100"]), environ=env)
    assert (s.grpc_port, s.max_batch_size, s.projection) == (9100, 8, "fast")


def test_kserve_transformer_flags_are_accepted():
    s = serve_settings(parse(["--model_name", "fashion-mnist", "--predictor_host", "isvc-predictor:80",
                              "--grpc_port", "8081", "--http_port", "8080", "--predictor_protocol", "grpc-v2"]),
                       environ={})
    assert (s.model_name, s.downstream, s.grpc_port, s.http_port) == ("fashion-mnist", "isvc-predictor:80", 8081, 8080)


def test_every_flag_has_an_environment_variable():
    p = argparse.ArgumentParser()
    from purifier.settings import add_serve_arguments

    add_serve_arguments(p)
    text = p.format_help()
    for flag in ("--model-dir", "--model-config", "--model", "--host", "--grpc-port", "--http-port", "--metrics-port", "--downstream",
                 "--model-name", "--device", "--threads", "--max-batch-size", "--max-queue-delay-ms",
                 "--max-queue-size", "--max-steps", "--max-restarts", "--projection", "--max-message-bytes",
                 "--tls-cert", "--tls-key", "--tls-client-ca", "--grace-seconds", "--log-level"):
        env = "PURIFIER_" + flag[2:].replace("-", "_").upper()
        assert flag in text and env in text.replace("\n", "").replace(" ", ""), flag


@pytest.mark.parametrize("changes, words", [
    (dict(grpc_port=70000), "--grpc-port 70000"),
    (dict(max_batch_size=0), "--max-batch-size 0: must be at least 1"),
    (dict(projection="slow"), "choose one of paper, fast, fast-precise"),
    (dict(downstream="localhost:http"), "give host:port"),
    (dict(tls_cert="/nonexistent.pem"), "needs both --tls-cert and --tls-key"),
    (dict(tls_client_ca="ca.pem"), "needs --tls-cert"),
    (dict(log_level="loud"), "--log-level"),
    (dict(max_queue_delay_ms=-1), ">= 0"),
])
def test_bad_values_say_how_to_fix_them(changes, words):
    with pytest.raises(ConfigError) as e:
        ServeSettings(**changes)
    assert words in str(e.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="PURIFIER_MAX_STEPS='many'"):
        serve_settings(parse([]), environ={"PURIFIER_MAX_STEPS": "many"})


def test_settings_are_frozen():
    with pytest.raises(Exception):
        ServeSettings().grpc_port = 1


def test_kserve_predictor_host_without_port_means_port_80():
    # KServe passes '<isvc>-predictor.<namespace>' with no port.
    assert ServeSettings(downstream="flowers-predictor.default").downstream == "flowers-predictor.default:80"
    assert ServeSettings(downstream="localhost:8001").downstream == "localhost:8001"


def test_every_projection_a_server_takes_is_a_preset():
    from purifier.projection import PRESETS
    from purifier.settings import PROJECTIONS

    assert set(PROJECTIONS) <= set(PRESETS) and "fast-precise" in PROJECTIONS
