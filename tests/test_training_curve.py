"""scripts/training_curve.py: the robustness-vs-iterations table reads what the evals wrote."""

import json

import pytest


def _result(dataset: str, n: int, clean: float, oblivious: float, transfer: float) -> dict:
    def cell(threat, acc):
        return {"threat": threat, "attack": "fgsm", "eps": 0.3,
                "purified": {"accuracy": acc, "ci95": [acc - 0.01, acc + 0.01]}}
    return {"settings": {"dataset": dataset},
            "clean": {"n": n, "purified": {"accuracy": clean, "ci95": [clean - 0.01, clean + 0.01]}},
            "cells": [cell("oblivious", oblivious), cell("transfer", transfer)]}


def _write(folder, result):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(result))


def test_sweep_and_shipped_rows_in_iteration_order(tmp_path, load_script, capsys):
    curve = load_script("training_curve")
    lease = tmp_path / "lease"
    _write(lease / "sweep" / "mnist-iter010000", _result("mnist", 500, 0.986, 0.168, 0.262))
    _write(lease / "mnist-paper", _result("mnist", 1000, 0.985, 0.405, 0.449))
    _write(tmp_path / "cpu-93k", _result("fashion-mnist", 1000, 0.84, 0.25, 0.18))
    _write(tmp_path / "cpu-100k", _result("mnist", 1000, 0.971, 0.691, 0.667))
    curve.main([f"{lease}:28000", "--shipped", f"{tmp_path / 'cpu-100k'}:100750",
                "--shipped", f"{tmp_path / 'cpu-93k'}:93000"])
    out = capsys.readouterr().out
    mnist, fmnist = out.split("**fashion-mnist**")
    rows = [line for line in mnist.splitlines() if line.startswith("| 1") or line.startswith("| 2")]
    assert [r.split("|")[1].strip() for r in rows] == ["10,000", "28,000", "100,750"]
    assert "| 100,750 | shipped | 1000 | 0.971 [0.961, 0.981] | 0.691 [0.681, 0.701] | 0.667 [0.657, 0.677] |" in mnist
    assert "| 93,000 | shipped | 1000 | 0.840" in fmnist


def test_shipped_needs_iterations(tmp_path, load_script):
    curve = load_script("training_curve")
    _write(tmp_path / "x", _result("mnist", 10, 0.9, 0.5, 0.5))
    with pytest.raises(SystemExit):
        curve.main([str(tmp_path / "nothing"), "--shipped", str(tmp_path / "x")])
