"""`purifier` reports an error raised on purpose as one line with a hint, exit status 2, for
every command (cli.main catches it once); a bug keeps its traceback."""

from __future__ import annotations

import pytest

from purifier import cli

CASES = {
    "purify": (["purify", "x.png", "--model-dir", "{missing}", "--out", "{tmp}/o"], "does not exist",
               "check the model directory"),
    "eval": (["eval", "{missing}", "--out", "{tmp}/e", "--dataset", "mnist"], "does not exist",
             "check the model directory"),
    "calibrate": (["calibrate", "{missing}", "--target-fpr", "2"], "--target-fpr must be in [0, 1)",
                  "see `purifier calibrate --help`"),
    "bench": (["bench", "--config", "x=slow"], "unknown projection preset 'slow'", "see `purifier bench --help`"),
    "train-encoder": (["train-encoder", "--model-dir", "{missing}", "--steps", "1"], "does not exist",
                      "check the model directory"),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_purifier_errors_are_one_line_with_a_hint(command, tmp_path, capsys):
    argv, message, hint = CASES[command]
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"purifier {command}: error: ") and message in err[0]
    assert f"(hint: {hint}" in err[0] and err[0].endswith(")")


def test_serve_reports_a_missing_model_dir_with_where_to_set_it(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "purifier.cli", "serve", "--model-dir", str(tmp_path / "missing"),
                           "--grpc-port", "0", "--metrics-port", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("purifier serve: error: model directory") and "PURIFIER_MODEL_DIR" in last


def test_a_bug_is_not_swallowed(monkeypatch):
    from purifier.commands import bench

    def broken(args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(bench, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["bench"])


def test_messages_spanning_lines_are_printed_on_one(monkeypatch, capsys):
    from purifier.commands import bench
    from purifier.errors import ConfigError

    def fails(args):
        raise ConfigError("first line\n  second line")
    monkeypatch.setattr(bench, "run", fails)
    assert cli.main(["bench"]) == 2
    assert capsys.readouterr().err == ("purifier bench: error: first line second line "
                                       "(hint: see `purifier bench --help`)\n")
