"""results.json, report.md and the multirun summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from causal_ie.explain.figures import plot_examples
from causal_ie.explain.report import LocalisationReport
from causal_ie.outputs.report import write_report
from causal_ie.outputs.results import flatten, read_results, write_results
from causal_ie.outputs.sweeps import collect_sweep
from causal_ie.report import main, summarize_evaluation


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
    assert read_results(tmp_path) == _results(0.75, 0.5)
    assert not list(tmp_path.glob(".*tmp*"))
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
    section = LocalisationReport()
    report = write_report(tmp_path, _results(0.75, 0.5), [section], {section.name: {"maps": fig}}).read_text()
    assert "![maps](figures/maps.png)" in report
    ce_row = next(line for line in report.splitlines() if line.startswith("| ce |"))
    # pointing game, energy pointing game (not given: n/a), iobb@0.1, ...; then deletion/insertion AUC
    assert ce_row.startswith("| ce | 0.750 | n/a | 0.500 |") and ce_row.endswith("| 0.200 | 0.700 |")
    assert "| Mass | 1.000 |" in report


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


def test_read_results_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results file"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text('{"run": ')
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        read_results(tmp_path / "results.json")


def test_summarize_names_a_missing_or_empty_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_sweep(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no runs with results.json"):
        collect_sweep(tmp_path / "empty")


def test_transfer_matrices_only_compare_runs_that_differ_in_attack_settings(tmp_path):
    """A sweep over attack.eps x mask.size: one transfer matrix per mask size."""
    import yaml

    from causal_ie.attacks.detection import DetectionData, save_detection_data

    rng = np.random.default_rng(0)
    groups = [f"p{i}" for i in range(20)]
    for run, (eps, size) in enumerate([(0.01, 4), (0.02, 4), (0.01, 8), (0.02, 8)]):
        d = tmp_path / str(run)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"attack.eps={eps}", f"mask.size={size}"]))
        write_results(d, {**_results(0.5, 0.5), "detection": {"detector": "logistic", "ce": {"auroc": 0.7}}})
        clean = rng.normal(size=(20, 3))
        save_detection_data(
            d / "detection.npz",
            DetectionData(clean, clean + eps * 100, ["a", "b", "c"], groups, groups, seed=0),
        )
    out = summarize_evaluation(tmp_path)
    assert {"transfer_0_csv", "transfer_1_csv"} <= set(out) and "transfer_csv" not in out
    md = (tmp_path / "summary.md").read_text()
    assert "Detection transfer (mask.size=4)" in md and "Detection transfer (mask.size=8)" in md
    header = (tmp_path / "transfer_0.csv").read_text().splitlines()[0]
    assert "attack.eps=0.01" in header and "mask.size" not in header


def test_docs_results_md_is_rendered_from_the_schema():
    from conftest import ROOT

    from causal_ie.outputs.schema import render_markdown

    assert (ROOT / "docs" / "results.md").read_text() == render_markdown(), (
        "docs/results.md is stale: python -c 'from causal_ie.outputs.schema import render_markdown; "
        "open(\"docs/results.md\", \"w\").write(render_markdown())'"
    )


def test_schema_names_unknown_keys_wrong_types_and_accepts_intervals():
    from causal_ie.outputs.schema import EVALUATION, problems

    good = {
        "classification": {"auroc_mean": 0.9, "auroc_mean_ci_low": 0.85, "auroc_mean_ci_high": 0.95,
                           "auroc": {"Mass": 0.8}},
        "localisation": {"ce": {"pointing_game": 0.5, "iobb@0.3": 0.25, "pairs": 4}},
        "run": {"ce_latent": {"space": "autoencoder"}},
    }
    assert problems(good, EVALUATION) == []
    bad = {
        "classification": {"auroc_mean": "high", "num_images_ci_low": 3},
        "localisation": {"ce": {"pointing_gme": 0.5, "iobb@high": 0.1}},
        "faithfulness": 0.3,
    }
    assert sorted(problems(bad, EVALUATION)) == [
        "classification.auroc_mean: expected number, got str 'high'",
        "classification.num_images_ci_low: not in the schema",
        "faithfulness: expected a section, got float 0.3",
        "localisation.ce.iobb@high: not in the schema",
        "localisation.ce.pointing_gme: not in the schema",
    ]


def test_adaptive_section_labels_each_detector_by_its_intervals():
    from causal_ie.attacks.report import AttackReport

    def scores(auroc, low, high):
        return {"auroc": auroc, "auroc_ci_low": low, "auroc_ci_high": high}

    det = {
        "ce": scores(0.98, 0.97, 0.99), "noise_flip": scores(0.88, 0.86, 0.90), "max_prob": scores(0.74, 0.70, 0.77),
        "adaptive": {
            "attacked": ["ce", "max_prob"], "not_attacked": ["noise_flip"], "eot_samples": 4, "images": 10,
            "success_rate": 0.9, "weights": [0.01], "steps": 20, "selective": True,
            "ce": {**scores(0.13, 0.09, 0.17), "n_test": 9},            # falls: interval below the plain one
            "noise_flip": {**scores(0.86, 0.83, 0.89), "n_test": 9},    # overlaps: holds, though not attacked
            "max_prob": {**scores(0.72, 0.69, 0.75), "n_test": 9},
            "evasion": {"n": 10, "ce": 0.9, "ce_ci_low": 0.7, "ce_ci_high": 1.0, "all": 0.2, "all_ci_low": 0.0,
                        "all_ci_high": 0.4},
            "non_adaptive_evasion": {"ce": 0.1, "ce_ci_low": 0.0, "ce_ci_high": 0.3, "all": 0.0, "all_ci_low": 0.0,
                                     "all_ci_high": 0.0},
            "evasion_difference": {"ce": 0.8, "ce_ci_low": 0.5, "ce_ci_high": 1.0, "all": 0.2, "all_ci_low": 0.0,
                                   "all_ci_high": 0.4},
        },
    }
    text = "\n".join(AttackReport._adaptive(det))
    assert "knows ce, max_prob" in text and "Not attacked (no gradient): noise_flip." in text
    assert ("| ce | 0.980 [0.970, 0.990] | 0.130 [0.090, 0.170] | n/a | 9 | 0.100 [0.000, 0.300] | 0.900 [0.700, 1.000] "
            "| 0.800 [0.500, 1.000] | non-adaptive attacker only |") in text
    assert "| noise_flip (not attacked) | 0.880 [0.860, 0.900] | 0.860 [0.830, 0.890] |" in text
    assert "| all at once |  |  |  |  | 0.000 [0.000, 0.000] | 0.200 [0.000, 0.400] | 0.200 [0.000, 0.400] |  |" in text
    assert "20 steps, selective" in text and "EOT over 4 draws" in text


def test_every_interval_sits_in_its_values_cell(tmp_path):
    from causal_ie.attacks.report import AttackReport
    from causal_ie.explain.figures import plot_method_scores

    results = {
        "run": {"checkpoint": "none", "approx": {"speedup": 2.5, "speedup_ci_low": 2.0, "speedup_ci_high": 3.0}},
        "classification": {
            "auroc_mean": 0.9981, "auroc_mean_ci_low": 0.9894, "auroc_mean_ci_high": 1.0, "num_images": 40,
            "auroc": {"Atelectasis": 0.8, "Atelectasis_ci_low": 0.7, "Atelectasis_ci_high": 0.9, "Mass": float("nan")},
        },
        "localisation": {
            "ce": {"pointing_game": 0.75, "pointing_game_ci_low": 0.6, "pointing_game_ci_high": 0.875,
                   "iobb@0.5": 0.5, "iobb@0.5_ci_low": 0.25, "iobb@0.5_ci_high": 0.625,
                   "minus": {"gradcam": {"pointing_game": 0.25, "pointing_game_ci_low": 0.05, "pointing_game_ci_high": 0.45}}},
            "gradcam": {"pointing_game": 0.5, "pointing_game_ci_low": 0.3, "pointing_game_ci_high": 0.7},
        },
        "localisation_pairs": 20,
        "attack": {"name": "pgd", "mode": "untargeted", "target": "top", "norm": "Linf", "eps": 0.008,
                   "success_rate": 0.9, "success_rate_ci_low": 0.8, "success_rate_ci_high": 0.95,
                   "eligible_images": 20, "num_images": 20, "flip_rate": 0.5, "auroc_mean": 0.4},
    }
    sections = [LocalisationReport(), AttackReport()]
    report = write_report(tmp_path, results, sections, {}).read_text()
    assert "_ci_" not in report  # no bound gets a row or a column of its own
    rows = report.splitlines()
    assert "| Atelectasis | 0.800 [0.700, 0.900] |" in rows
    assert "| Mass | n/a |" in rows
    assert "| mean | 0.998 [0.989, 1.000] |" in rows
    assert "| approx.speedup | 2.500 [2.000, 3.000] |" in rows
    ce = next(r for r in rows if r.startswith("| ce |"))
    assert ce.startswith("| ce | 0.750 [0.600, 0.875] | n/a |") and "| 0.500 [0.250, 0.625] |" in ce
    assert "| ce | gradcam | 0.250 [0.050, 0.450] |" in rows
    assert any(r.startswith("| 0.900 [0.800, 0.950] | 20 / 20 | 0.500 | 0.998 [0.989, 1.000] | 0.400 |") for r in rows)
    # the bar chart draws the same intervals as error bars
    path = plot_method_scores(results, tmp_path / "method_scores.png")
    assert path.stat().st_size > 1000
