"""The attack study's outputs: its report.md section, figures and detection.npz, and the
detection-transfer matrices of a sweep."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from causal_ie.attacks.detection import DETECTION_FILE, load_detection_data, save_detection_data, transfer_matrix
from causal_ie.attacks.figures import (
    plot_clean_vs_adversarial,
    plot_roc_curves,
    plot_statistic_histograms,
    plot_transfer_matrix,
)
from causal_ie.io import atomic_write_text
from causal_ie.outputs.report import Figures
from causal_ie.outputs.tables import fmt, markdown_table, result_cell, result_cells

log = logging.getLogger(__name__)


class AttackReport:
    """The attack, the CE statistics clean vs adversarial, the detectors; their figures and
    ``detection.npz`` (the features of every image pair, for transfer between runs).

    Artefacts (from :class:`causal_ie.attacks.evaluation.AttackEvaluation`): ``examples``,
    ``statistics`` (``clean``/``adv``: name -> values per image), ``roc`` (detector -> (fpr, tpr,
    auroc)) and ``detection_data``.
    """

    name = "attack"
    headline = ("attack.success_rate", "detection.ce.auroc", "detection.ce.tpr@5fpr", "detection.max_prob.auroc",
                "detection.noise_flip.auroc")

    def markdown(self, results: Mapping[str, Any]) -> list[str]:
        attack = results.get("attack")
        if not attack:
            return []
        pert = attack.get("perturbation", {})
        parts = [
            f"## Adversarial attack: {attack['name']} ({attack['mode']}, target {attack['target']}, "
            f"{attack['norm']} eps {fmt(attack['eps'])})",
            "",
            markdown_table(
                ["success rate", "eligible images", "flip rate", "mean AUROC clean", "mean AUROC attacked", "L-inf", "L2", "L0 share"],
                [[result_cell(attack, "success_rate"), f"{attack['eligible_images']} / {attack['num_images']}",
                  result_cell(attack, "flip_rate"), result_cell(results.get("classification", {}), "auroc_mean"),
                  result_cell(attack, "auroc_mean"), result_cell(pert, "linf", 4), result_cell(pert, "l2", 4),
                  result_cell(pert, "l0")]],
            ),
            "",
            "Success rate: among images the attack could change (untargeted: the attacked findings were "
            "predicted right on the clean image), the share where an attacked prediction flipped "
            "(targeted: reached the goal). Flip rate: share of attacked (image, finding) predictions "
            "that changed at threshold 0.5.",
            "",
        ]
        under = results.get("ce_under_attack", {})
        if under:
            rows = [
                [method, stat, *(result_cell(v, k) for k in ("clean_mean", "adv_mean", "separation_auroc"))]
                for method, stats in under.items()
                for stat, v in stats.items()
            ]
            parts += [
                "### CE maps under attack (the attacked, or most likely, finding's map)",
                "",
                "Separation: AUROC of the statistic alone for adversarial vs clean (0.5: no difference).",
                "",
                markdown_table(["method", "statistic", "clean mean", "adversarial mean", "separation"], rows),
                "",
            ]
        det = results.get("detection", {})
        scored = {k: v for k, v in det.items() if isinstance(v, Mapping) and k not in ("changed_pairs", "adaptive")
                  and "skipped" not in det}
        if scored:
            rows = [
                [k, result_cell(v, "auroc"), result_cell(v, "tpr@5fpr"), v.get("n_test", "?"), v.get("n_train", "?"),
                 v.get("features", "?"), v.get("estimator", "?")]
                for k, v in scored.items()
                if k not in ("changed_pairs", "adaptive")
            ]
            parts += [
                f"### Detection on {det.get('images', '?')} {det.get('pairs', '?')} pairs (every pair scored by "
                f"detectors fitted on the other half of the patients, {det.get('repeats', 1)} cross-fits; 95 % "
                "patient-bootstrap intervals)",
                "",
                markdown_table(["detector", "AUROC", "TPR at 5% FPR", "pairs scored", "pairs per training half",
                                "features", "estimator"], rows),
                "",
                "ROC curves: the pooled out-of-sample scores.",
                "",
            ]
            parts += self._differences(scored)
        if "skipped" in det:
            parts += ["### Detection", "", f"Not scored: {det['skipped']}.", ""]
        parts += self._adaptive(det)
        return parts

    @staticmethod
    def _differences(scored: Mapping[str, Any]) -> list[str]:
        rows = [
            [name, baseline, cell]
            for name, scores in scored.items()
            for baseline, cell in result_cells(scores.get("auroc_minus", {}))
        ]
        if not rows:
            return []
        return [
            "AUROC differences on the same pairs (detector minus baseline, 95 % paired patient-bootstrap interval):",
            "",
            markdown_table(["detector", "baseline", "difference"], rows),
            "",
        ]

    @staticmethod
    def _adaptive(det: Mapping[str, Any]) -> list[str]:
        adaptive = det.get("adaptive")
        if not adaptive:
            return []
        attacked = list(adaptive.get("attacked", []))
        evasion = adaptive.get("evasion", {})
        before_evasion, difference = adaptive.get("non_adaptive_evasion", {}), adaptive.get("evasion_difference", {})
        rows = []
        for name, v in adaptive.items():
            if not isinstance(v, Mapping) or "auroc" not in v:
                continue
            before = det.get(name, {})
            drop = (
                v.get("auroc_ci_high") is not None
                and before.get("auroc_ci_low") is not None
                and v["auroc_ci_high"] < before["auroc_ci_low"]
            )
            verdict = "non-adaptive attacker only" if drop else "holds"
            rows.append([
                name + ("" if name in attacked else " (not attacked)"),
                result_cell(before, "auroc"), result_cell(v, "auroc"), result_cell(v, "tpr@5fpr"),
                v.get("n_test", "?"), result_cell(before_evasion, name), result_cell(evasion, name),
                result_cell(difference, name), verdict,
            ])
        rows.append(["all at once", "", "", "", "", result_cell(before_evasion, "all"), result_cell(evasion, "all"),
                     result_cell(difference, "all"), ""])
        not_attacked = adaptive.get("not_attacked") or []
        return [
            f"### Against an adaptive attacker (knows {', '.join(attacked) or '?'})",
            "",
            f"{adaptive.get('images', '?')} clean images attacked again on the classification loss minus lambda "
            f"times the attacked detectors' joint logit (each at its own 5 %-FPR threshold; lambda schedule "
            f"{adaptive.get('weights')}, {adaptive.get('steps', '?')} steps{', orthogonal' if adaptive.get('orthogonal') else ', selective' if adaptive.get('selective') else ''}, "
            f"EOT over {adaptive.get('eot_samples', '?')} draws for randomised detectors); the attack reached its goal on "
            f"{fmt(adaptive.get('success_rate'))} of them. Each detector is fitted on the other patients' non-adaptive "
            "pairs. Evasion: the share of the attacked images that reached the goal below the detector's threshold "
            "('all at once': below every selected detector's), non-adaptive vs adaptive attack on the same images, "
            "and the paired difference (95 % patient-bootstrap intervals). 'non-adaptive attacker only': the AUROC "
            "interval under this attack lies entirely below the non-adaptive one."
            + (f" Not attacked (no gradient): {', '.join(not_attacked)}." if not_attacked else ""),
            "",
            markdown_table(["detector", "AUROC non-adaptive", "AUROC adaptive", "TPR at 5% FPR adaptive", "pairs",
                            "evasion non-adaptive", "evasion adaptive", "difference", "verdict"], rows),
            "",
        ]

    def write_artefacts(self, out_dir: Path, results: Mapping[str, Any], artefacts: Mapping[str, Any]) -> Figures:
        if artefacts.get("detection_data") is not None:  # None: too few pairs, detection was skipped
            save_detection_data(out_dir / DETECTION_FILE, artefacts["detection_data"])
        fig_dir = out_dir / "figures"
        figures: Figures = {}
        if artefacts.get("examples"):
            figures["CE maps, clean vs adversarial"] = plot_clean_vs_adversarial(
                artefacts["examples"], fig_dir / "adversarial_maps.png"
            )
        stats = artefacts["statistics"]
        figures["CE statistics, clean vs adversarial"] = plot_statistic_histograms(
            stats["clean"], stats["adv"], fig_dir / "adversarial_statistics.png"
        )
        if artefacts.get("roc"):
            figures["Detection ROC (held-out half)"] = plot_roc_curves(artefacts["roc"], fig_dir / "detection_roc.png")
        return figures


class DetectionTransfer:
    """Sweep extension: train the CE detector on each attacked run and test it on every other.

    Only runs that differ in attack settings alone are compared (a detector trained on
    8 px CE maps says nothing about 16 px ones): one matrix per combination of the other
    swept settings, ``transfer[_<i>].csv/png``. The detector is the runs' CE detector's
    estimator (``detection.ce.estimator``), on each run's first split.
    """

    def __call__(self, sweep_dir: Path, runs: pd.DataFrame, params: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
        attack_params = [p for p in params if p == "attack" or p.startswith("attack.")]
        other_params = [p for p in params if p not in attack_params]
        groups: dict[str, dict[str, Any]] = {}
        for _, row in runs.iterrows():
            path = sweep_dir / str(row["run"]) / DETECTION_FILE
            if not path.is_file():
                continue
            context = ", ".join(f"{p}={row[p]}" for p in other_params)
            label = ", ".join(f"{p}={row[p]}" for p in attack_params) or str(row["run"])
            groups.setdefault(context, {})[label] = load_detection_data(path)
        key = "detection.ce.estimator"
        detectors = runs[key].dropna() if key in runs else pd.Series(dtype=object)
        kind = str(detectors.iloc[0]) if len(detectors) else "logistic"
        files: dict[str, Path] = {}
        lines: list[str] = []
        comparable = {c: data for c, data in groups.items() if len(data) >= 2}
        for i, (context, data) in enumerate(comparable.items()):
            if len({tuple(d.feature_names) for d in data.values()}) > 1:
                log.warning("runs %s have different CE features: no transfer matrix", context or "of this sweep")
                continue
            matrix = transfer_matrix(data, kind=kind)
            stem = "transfer" if len(comparable) == 1 else f"transfer_{i}"
            files[f"{stem}_csv"] = atomic_write_text(sweep_dir / f"{stem}.csv", matrix.to_csv())
            files[f"{stem}_png"] = plot_transfer_matrix(matrix, sweep_dir / f"{stem}.png")
            title = "Detection transfer" + (f" ({context})" if context else "")
            table = markdown_table(
                ["trained on \\ tested on", *map(str, matrix.columns)],
                ([str(name), *(float(v) for v in row)] for name, row in zip(matrix.index, matrix.to_numpy())),
            )
            lines += ["", f"## {title}", "", "AUROC; rows: trained on, columns: tested on (unseen patients; first split).", "", table]
        return files, lines
