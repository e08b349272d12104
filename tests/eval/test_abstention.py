"""`purifier eval`'s abstention numbers at the card threshold (what a caller of a server with
--on-flagged reject gets), in results.json and results.md, on tiny models: consistent with the
detection rates, and exact at the two extreme thresholds."""

from __future__ import annotations

import json

from purifier import checkpoint, cli


def run_eval(model_dir, data_dir, out, threshold: float) -> tuple[dict, str]:
    checkpoint.update_card(model_dir, detection={"threshold": threshold})
    rc = cli.main(["eval", str(model_dir), "--dataset", "mnist", "--data-dir", str(data_dir),
                   "--out", str(out), "--n", "8", "--attacks", "fgsm", "--eps", "0.1,0.3", "--steps", "2",
                   "--restarts", "1", "--device", "cpu", "--no-progress"])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def rows(results: dict) -> list[dict]:
    return [results["clean"]] + results["cells"]


def test_abstention_agrees_with_the_detection_rates(tiny_model_dir, tiny_data_dir, tmp_path):
    # the median clean error: some clean images rejected, some not
    probe, _ = run_eval(tiny_model_dir, tiny_data_dir, tmp_path / "probe", 0.05)
    t = probe["clean"]["reconstruction_error"]["median"]
    results, table = run_eval(tiny_model_dir, tiny_data_dir, tmp_path / "mid", t)
    clean = results["clean"]["abstention"]
    assert clean["threshold"] == t and not clean["attacked"]
    assert 0 < clean["rejected"]["count"] < 8                     # a mixed case, not an extreme
    assert clean["rejected"]["rate"] == results["clean"]["detection_at_card_threshold"]["fpr"]
    for row in results["cells"]:
        a = row["abstention"]
        assert a["attacked"] and a["rejected"]["rate"] == row["detection"]["at_card_threshold"]["tpr"]
        k_rej, n = a["rejected"]["count"], row["n"]
        assert a["accepted_accuracy"]["n"] == n - k_rej
        assert a["protected_accuracy"]["correct"] == a["accepted_accuracy"]["correct"] + k_rej
    assert "| protected accuracy |" in table and f"card threshold {t:.6g}" in table
    a = results["cells"][0]["abstention"]["protected_accuracy"]
    assert f"| {a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] |" in table


def test_abstention_at_the_extreme_thresholds(tiny_model_dir, tiny_data_dir, tmp_path):
    none, _ = run_eval(tiny_model_dir, tiny_data_dir, tmp_path / "none", 1e9)       # nothing rejected
    for row in rows(none):
        a = row["abstention"]
        assert a["rejected"]["count"] == 0
        assert a["protected_accuracy"]["accuracy"] == a["accepted_accuracy"]["accuracy"] == \
            row["purified"]["accuracy"]
    every, table = run_eval(tiny_model_dir, tiny_data_dir, tmp_path / "all", 0.0)    # everything rejected
    assert every["clean"]["abstention"]["rejected"]["rate"] == 1.0
    assert every["clean"]["abstention"]["protected_accuracy"]["accuracy"] == 0.0     # clean refused: no use
    for row in every["cells"]:
        assert row["abstention"]["protected_accuracy"]["accuracy"] == 1.0           # every attack stopped
        assert row["abstention"]["accepted_accuracy"]["n"] == 0
    assert "- (none accepted)" in table


def test_no_threshold_no_abstention(tiny_model_dir, tiny_data_dir, tmp_path):
    card = checkpoint.read_card(tiny_model_dir)
    card.pop("detection", None)
    checkpoint.write_card(tiny_model_dir, card)
    rc = cli.main(["eval", str(tiny_model_dir), "--dataset", "mnist", "--data-dir", str(tiny_data_dir),
                   "--out", str(tmp_path / "o"), "--n", "4", "--attacks", "fgsm", "--eps", "0.1", "--steps", "1",
                   "--restarts", "1", "--device", "cpu", "--no-progress"])
    assert rc == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert all("abstention" not in r for r in rows(results))
    assert "protected accuracy" not in (tmp_path / "o" / "results.md").read_text()
