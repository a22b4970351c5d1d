"""results.json, report.md and the multirun summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from causal_ie.report import collect_sweep, flatten, main, plot_examples, write_report, write_results


def _results(pg_ce: float, pg_cam: float) -> dict:
    return {
        "classification": {"auroc_mean": 0.9, "auroc": {"Atelectasis": 0.8, "Mass": 1.0}},
        "localisation": {
            "ce": {"pointing_game": pg_ce, "iobb@0.1": 0.5},
            "gradcam": {"pointing_game": pg_cam, "iobb@0.1": 0.25},
        },
        "faithfulness": {"ce": {"deletion_auc": 0.2, "insertion_auc": 0.7}},
    }


def test_flatten_joins_nested_keys_with_dots():
    flat = flatten(_results(0.75, 0.5))
    assert flat["localisation.ce.pointing_game"] == 0.75
    assert flat["classification.auroc.Mass"] == 1.0
    assert flat["faithfulness.ce.insertion_auc"] == 0.7


def test_results_are_written_atomically_and_report_links_figures(tmp_path):
    path = write_results(tmp_path, _results(0.75, 0.5))
    assert json.loads(path.read_text())["localisation"]["ce"]["pointing_game"] == 0.75
    assert not list(tmp_path.glob("*.tmp*"))
    example = {
        "id": "img0",
        "finding": "Mass",
        "prob": 0.9,
        "image": np.random.default_rng(0).random((16, 16)),
        "box": [2.0, 3.0, 5.0, 4.0],
        "maps": {"ce": np.random.default_rng(1).normal(size=(16, 16)), "gradcam": np.ones((16, 16))},
    }
    fig = plot_examples([example], ["ce", "gradcam"], tmp_path / "figures" / "maps.png")
    assert fig.stat().st_size > 1000
    report = write_report(tmp_path, _results(0.75, 0.5), {"maps": fig}).read_text()
    assert "![maps](figures/maps.png)" in report
    ce_row = next(line for line in report.splitlines() if line.startswith("| ce |"))
    assert "0.750" in ce_row and "0.200" in ce_row


def _fake_run(sweep, name: str, overrides: list[str], results: dict | None) -> None:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is None:
        (run / "error.txt").write_text("Traceback ...")
    else:
        (run / "results.json").write_text(json.dumps(results))


def test_summarize_tabulates_every_run_and_plots_the_swept_setting(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    _fake_run(sweep, "0", ["mask.size=8"], _results(0.5, 0.4))
    _fake_run(sweep, "1", ["mask.size=16"], _results(0.7, 0.4))
    _fake_run(sweep, "2", ["mask.size=32"], None)
    df = collect_sweep(sweep)
    assert list(df["mask.size"]) == [8, 16, 32]
    assert list(df["status"]) == ["ok", "ok", "failed"]
    main(["summarize", str(sweep)])
    assert "summary.md" in capsys.readouterr().out
    md = (sweep / "summary.md").read_text()
    assert "| 1 | 16 | ok | 0.900 | 0.700 | 0.400 |" in md
    assert (sweep / "summary_mask.size.png").stat().st_size > 1000


def test_summarize_names_a_missing_or_empty_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_sweep(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no runs with results.json"):
        collect_sweep(tmp_path / "empty")
