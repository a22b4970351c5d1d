"""Run reports: results.json, report.md with PNG figures, and sweep summaries.

`python -m causal_ie.report summarize <multirun dir>` turns every run of a
Hydra multirun into one row of a table (the swept overrides beside the
metrics) and plots the metrics against each swept setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from causal_ie.io import atomic_write_json, atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


# -- results --------------------------------------------------------------------
def flatten(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested results -> {"localisation.ce.pointing_game": value, ...}."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def write_results(out_dir: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``results.json`` (nested; see DESIGN section 4 for the keys) atomically."""
    return atomic_write_json(Path(out_dir) / RESULTS_FILE, results)


# -- figures --------------------------------------------------------------------
def _draw_box(ax, box: Sequence[float], color: str = "lime") -> None:
    if box is None or any(math.isnan(float(v)) for v in box):
        return
    x, y, w, h = (float(v) for v in box)
    # boxes are in pixel-edge coordinates; imshow puts pixel centres at integers
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=color, linewidth=1.5))


def plot_examples(examples: Sequence[Mapping[str, Any]], methods: Sequence[str], path: str | Path) -> Path:
    """One row per (image, finding): the image with its box, then each method's map.

    Maps are shown with a symmetric diverging scale when they have both signs
    (CE can be negative: an intervention that raises the prediction), else 0..max.
    """
    rows, cols = len(examples), 1 + len(methods)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.2 * rows), squeeze=False)
    for r, ex in enumerate(examples):
        ax = axes[r, 0]
        ax.imshow(ex["image"], cmap="gray", vmin=0, vmax=1)
        _draw_box(ax, ex["box"])
        ax.set_title(f"{ex['finding']}\np={ex['prob']:.2f}", fontsize=8)
        for c, method in enumerate(methods, start=1):
            ax = axes[r, c]
            m = np.asarray(ex["maps"][method], dtype=float)
            lo, hi = float(m.min()), float(m.max())
            if lo < 0 < hi:
                v = max(-lo, hi)
                im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v)
            else:
                im = ax.imshow(m, cmap="inferno", vmin=min(lo, 0), vmax=hi if hi > lo else lo + 1e-8)
            ax.imshow(ex["image"], cmap="gray", alpha=0.25, vmin=0, vmax=1)
            _draw_box(ax, ex["box"])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
            if r == 0:
                ax.set_title(method, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def plot_method_scores(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Bars per method: pointing game, energy pointing game, deletion and insertion AUC."""
    loc = results.get("localisation", {})
    faith = results.get("faithfulness", {})
    methods = list(loc) or list(faith)
    if not methods:
        return None
    scores = {
        "pointing game ↑": [loc.get(m, {}).get("pointing_game", np.nan) for m in methods],
        "energy pointing game ↑": [loc.get(m, {}).get("energy_pointing_game", np.nan) for m in methods],
        "deletion AUC ↓": [faith.get(m, {}).get("deletion_auc", np.nan) for m in methods],
        "insertion AUC ↑": [faith.get(m, {}).get("insertion_auc", np.nan) for m in methods],
    }
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3), squeeze=False)
    for ax, (title, vals) in zip(axes[0], scores.items()):
        ax.bar(range(len(methods)), vals, color=["tab:red" if m.startswith("ce") else "tab:gray" for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# -- report.md ------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def method_table(results: Mapping[str, Any], thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.7)) -> str:
    """Markdown table: localisation and faithfulness per explanation method."""
    loc = results.get("localisation", {})
    faith = results.get("faithfulness", {})
    cols = ["pointing_game", "energy_pointing_game"] + [f"iobb@{t:.1f}" for t in thresholds] + [
        f"iou@{t:.1f}" for t in thresholds
    ]
    header = ["method", *cols, "deletion_auc", "insertion_auc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in dict.fromkeys([*loc, *faith]):
        row = [m] + [_fmt(loc.get(m, {}).get(c, float("nan"))) for c in cols]
        row += [_fmt(faith.get(m, {}).get(c, float("nan"))) for c in ("deletion_auc", "insertion_auc")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def attack_section(results: Mapping[str, Any]) -> list[str]:
    """report.md lines for an attacked run: the attack, CE statistics clean vs adversarial, detection."""
    attack = results.get("attack")
    if not attack:
        return []
    pert = attack.get("perturbation", {})
    clean_auroc = results.get("classification", {}).get("auroc_mean", float("nan"))
    parts = [
        f"## Adversarial attack: {attack['name']} ({attack['mode']}, target {attack['target']}, "
        f"{attack['norm']} eps {_fmt(attack['eps'])})",
        "",
        "| success rate | eligible images | flip rate | mean AUROC clean | mean AUROC attacked | L-inf | L2 | L0 share |",
        "|---|---|---|---|---|---|---|---|",
        f"| {_fmt(attack['success_rate'])} | {attack['eligible_images']} / {attack['num_images']} | "
        f"{_fmt(attack['flip_rate'])} | {_fmt(clean_auroc)} | {_fmt(attack['auroc_mean'])} | "
        f"{pert.get('linf', float('nan')):.4f} | {pert.get('l2', float('nan')):.4f} | {_fmt(pert.get('l0'))} |",
        "",
        "Success rate: among images the attack could change (untargeted: the attacked findings were "
        "predicted right on the clean image), the share where an attacked prediction flipped "
        "(targeted: reached the goal). Flip rate: share of attacked (image, finding) predictions "
        "that changed at threshold 0.5.",
        "",
    ]
    under = results.get("ce_under_attack", {})
    if under:
        parts += [
            "### CE maps under attack (the attacked, or most likely, finding's map)",
            "",
            "Separation: AUROC of the statistic alone for adversarial vs clean (0.5: no difference).",
            "",
            "| method | statistic | clean mean | adversarial mean | separation |",
            "|---|---|---|---|---|",
        ]
        for method, stats in under.items():
            for stat, v in stats.items():
                parts.append(
                    f"| {method} | {stat} | {_fmt(v.get('clean_mean', float('nan')))} | "
                    f"{_fmt(v.get('adv_mean', float('nan')))} | {_fmt(v.get('separation_auroc', float('nan')))} |"
                )
        parts.append("")
    det = results.get("detection", {})
    scored = {k: v for k, v in det.items() if isinstance(v, Mapping)}
    if scored:
        parts += [
            f"### Detection ({det.get('detector', '?')} detector, trained on one patient-grouped half, "
            "scored on the other; mean over splits)",
            "",
            "| features | AUROC | ± std over splits | TPR at 5% FPR | splits | train / test images |",
            "|---|---|---|---|---|---|",
        ]
        parts += [
            f"| {k} | {_fmt(v.get('auroc'))} | {_fmt(v.get('auroc_std', float('nan')))} | {_fmt(v.get('tpr@5fpr'))} | "
            f"{v.get('splits', 1)} | {v.get('n_train', '?')} / {v.get('n_test', '?')} |"
            for k, v in scored.items()
        ]
        parts += ["", "ROC curves: the first split."]
        parts.append("")
    return parts


COUNTERFACTUAL_COLUMNS = ("n", "confidence_before", "confidence_after", "success_rate", "l0", "l1_5", "box_mass_share")


def counterfactual_section(results: Mapping[str, Any]) -> list[str]:
    """report.md lines for a counterfactual run: one row per method, then the shortcut comparison."""
    summary = results.get("counterfactual")
    if not summary:
        return []
    cols = [c for c in COUNTERFACTUAL_COLUMNS if any(c in s for s in summary.values())]
    parts = [
        "## Counterfactuals",
        "",
        "confidence: the target finding's probability before/after; success: the counterfactual "
        "crossed 0.5 in the asked direction; l0/l1_5: size of the change; box_mass_share: share of "
        "the change inside the lesion box.",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    parts += ["| " + " | ".join([m, *(_fmt(s.get(c, float("nan"))) for c in cols)]) + " |" for m, s in summary.items()]
    parts.append("")
    shortcut = {m: s["shortcut"] for m, s in summary.items() if "shortcut" in s}
    if shortcut:
        finding = next(iter(shortcut.values()))["finding"]
        parts += [
            f"Share of the change on the planted marker: counterfactuals for {finding} (the finding the "
            "marker was planted with) against those for the other findings.",
            "",
            f"| method | {finding} | other findings | pairs with marker ({finding} / others) |",
            "|---|---|---|---|",
        ]
        parts += [
            f"| {m} | {_fmt(v['marker_mass_share'])} | {_fmt(v['marker_mass_share_other_findings'])} | "
            f"{v['n_with_marker']} / {v['n_with_marker_other_findings']} |"
            for m, v in shortcut.items()
        ]
        parts.append("")
    return parts


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Any],
    figures: Mapping[str, str | Path],
    title: str = "causal-ie evaluation",
) -> Path:
    """``report.md`` beside ``results.json``: headline numbers, method table, figures."""
    out_dir = Path(out_dir)
    parts = [f"# {title}", ""]
    meta = results.get("run", {})
    if meta:
        parts += ["| setting | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in meta.items()] + [""]
    cls = results.get("classification", {})
    if cls:
        parts += [f"Classification: mean AUROC {_fmt(cls.get('auroc_mean'))} on {cls.get('num_images', '?')} test images.", ""]
        per = cls.get("auroc", {})
        if per:
            parts += ["| finding | AUROC |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in per.items()] + [""]
    if results.get("localisation") or results.get("faithfulness"):
        n = results.get("localisation_pairs", "?")
        parts += [
            f"## Localisation and faithfulness ({n} image-finding pairs with a box)",
            "",
            "Pointing game: share of maps whose maximum lies in the box. IoBB/IoU@T: overlap of the "
            "boxes around the map's regions above T (min-max normalised map) with the lesion box "
            "(Wang et al. 2017). Deletion/insertion AUC: prediction of the finding as pixels are "
            "removed/inserted in map order (lower/higher is better).",
            "",
            method_table(results),
            "",
        ]
    parts += attack_section(results)
    parts += counterfactual_section(results)
    for caption, fig in figures.items():
        rel = Path(fig).relative_to(out_dir) if Path(fig).is_absolute() else Path(fig)
        parts += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
    return atomic_write_text(out_dir / "report.md", "\n".join(parts))


# -- sweep summaries --------------------------------------------------------------
def collect_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run of a multirun: its overrides (as columns) and flattened results."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {str(sweep_dir)!r} does not exist")
    rows = []
    override_keys: dict[str, None] = {}
    for run in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        row: dict[str, Any] = {"run": run.name}
        overrides = run / ".hydra" / "overrides.yaml"
        settings: dict[str, Any] = {}
        if overrides.is_file():
            for item in yaml.safe_load(overrides.read_text()) or []:
                key, _, value = str(item).partition("=")
                settings[key.lstrip("+~")] = yaml.safe_load(value) if value else value
        results = run / RESULTS_FILE
        if results.is_file():
            row.update(flatten(json.loads(results.read_text())))
            row["status"] = "ok"
        elif (run / "error.txt").is_file():
            row["status"] = "failed"
        else:
            continue  # not a run directory (e.g. .submitit)
        # a swept key may also be a result (attack.eps): the setting as given wins
        row.update(settings)
        override_keys.update(dict.fromkeys(settings))
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no runs with {RESULTS_FILE} or error.txt under {sweep_dir}")
    df = pd.DataFrame(rows)
    df.attrs["overrides"] = list(override_keys)
    return df


HEADLINE = (
    "classification.auroc_mean",
    "localisation.ce.pointing_game",
    "localisation.gradcam.pointing_game",
    "faithfulness.ce.deletion_auc",
    "attack.success_rate",
    "detection.ce.auroc",
    "detection.ce.tpr@5fpr",
    "detection.max_prob.auroc",
    "detection.noise_flip.auroc",
)


def summarize(sweep_dir: str | Path, metrics: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary_<param>.png`` into the sweep directory."""
    sweep_dir = Path(sweep_dir)
    df = collect_sweep(sweep_dir)
    overrides = [c for c in df.attrs.get("overrides", []) if c in df.columns]
    metric_cols = [c for c in df.columns if c not in overrides and c not in ("run", "status")]
    # the swept settings: overrides whose value differs between runs (shared ones add nothing)
    params = [c for c in overrides if df[c].astype(str).nunique() > 1] or overrides[:1]
    shown = [m for m in (metrics or HEADLINE) if m in df.columns] or metric_cols[:6]
    out = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md"}
    atomic_write_text(out["csv"], df.to_csv(index=False))
    table = df[["run", *params, "status", *shown]]
    md = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    md += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    atomic_write_text(out["md"], f"# Sweep {sweep_dir.name}\n\n" + "\n".join(md) + "\n")
    for stem, (context, csv, png) in _detection_transfer(sweep_dir, df, params).items():
        out[f"{stem}_csv"], out[f"{stem}_png"] = csv, png
        title = "Detection transfer" + (f" ({context})" if context else "")
        atomic_write_text(
            out["md"],
            out["md"].read_text()
            + f"\n## {title}\n\nAUROC; rows: trained on, columns: tested on (unseen patients; first split).\n\n"
            + _markdown_matrix(pd.read_csv(csv, index_col=0))
            + "\n",
        )
    for param in params:
        values = pd.to_numeric(df[param], errors="coerce")
        if values.isna().all() or values.nunique() < 2:
            continue
        plot = _plot_against(df.assign(_x=values), param, shown, sweep_dir / f"summary_{param}.png", params)
        if plot is not None:
            out[f"plot_{param}"] = plot
    return out


DETECTION_FILE = "detection.npz"


def _detection_transfer(sweep_dir: Path, df: pd.DataFrame, params: Sequence[str]) -> dict[str, tuple[str, Path, Path]]:
    """Train the CE detector on each attacked run and test it on every other.

    Only runs that differ in attack settings alone are compared (a detector
    trained on 8 px CE maps says nothing about 16 px ones): one matrix per
    combination of the other swept settings, ``transfer[_<i>].csv/png``. The
    detector is the runs' ``detection.detector``, on each run's first split.
    """
    from causal_ie.attacks.detection import load_detection_data, transfer_matrix
    from causal_ie.attacks.figures import plot_transfer_matrix

    attack_params = [p for p in params if p == "attack" or p.startswith("attack.")]
    other_params = [p for p in params if p not in attack_params]
    groups: dict[str, dict[str, Any]] = {}
    for _, row in df.iterrows():
        path = sweep_dir / str(row["run"]) / DETECTION_FILE
        if not path.is_file():
            continue
        context = ", ".join(f"{p}={row[p]}" for p in other_params)
        label = ", ".join(f"{p}={row[p]}" for p in attack_params) or str(row["run"])
        groups.setdefault(context, {})[label] = load_detection_data(path)
    kind = str(df["detection.detector"].dropna().iloc[0]) if "detection.detector" in df and df["detection.detector"].notna().any() else "logistic"
    out = {}
    comparable = {c: runs for c, runs in groups.items() if len(runs) >= 2}
    for i, (context, runs) in enumerate(comparable.items()):
        if len({tuple(d.feature_names) for d in runs.values()}) > 1:
            log.warning("runs %s have different CE features: no transfer matrix", context or "of this sweep")
            continue
        matrix = transfer_matrix(runs, kind=kind)
        stem = "transfer" if len(comparable) == 1 else f"transfer_{i}"
        csv = atomic_write_text(sweep_dir / f"{stem}.csv", matrix.to_csv())
        out[stem] = (context, csv, plot_transfer_matrix(matrix, sweep_dir / f"{stem}.png"))
    return out


def _markdown_matrix(matrix: pd.DataFrame) -> str:
    lines = ["| trained on \\ tested on | " + " | ".join(map(str, matrix.columns)) + " |", "|" + "---|" * (len(matrix.columns) + 1)]
    lines += ["| " + " | ".join([str(i), *(_fmt(float(v)) for v in row)]) + " |" for i, row in zip(matrix.index, matrix.to_numpy())]
    return "\n".join(lines)


def _panels(df: pd.DataFrame, metrics: Sequence[str]) -> dict[str, list[str]]:
    """Plot panels: metrics that vary between runs, the detectors' AUROCs sharing one panel."""
    varying = [m for m in metrics if pd.to_numeric(df[m], errors="coerce").nunique(dropna=True) > 1]
    panels: dict[str, list[str]] = {}
    for m in varying:
        parts = m.split(".")
        if parts[0] == "detection" and parts[-1] == "auroc":
            panels.setdefault("detection AUROC (held-out half)", []).append(m)
        else:
            panels[m] = [m]
    return panels


def _plot_against(df: pd.DataFrame, param: str, metrics: Sequence[str], path: Path, params: Sequence[str]) -> Path | None:
    # one line per metric of a panel and per combination of the other swept settings
    panels = _panels(df, metrics)
    if not panels:
        return None
    others = [p for p in params if p != param]
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.1 * nrows), squeeze=False)
    keys = df[others].astype(str) if others else None  # lists etc. are not hashable
    groups = list(df.groupby([keys[o] for o in others], dropna=False)) if others else [((), df)]
    for ax, (title, names) in zip(axes.flat, panels.items()):
        for key, group in groups:
            g = group.sort_values("_x")
            setting = ", ".join(f"{o}={v}" for o, v in zip(others, key if isinstance(key, tuple) else (key,)))
            for m in names:
                label = ", ".join(x for x in (m.split(".")[1] if len(names) > 1 else "", setting) if x) or None
                ax.plot(g["_x"], pd.to_numeric(g[m], errors="coerce"), marker="o", label=label)
        ax.set_xlabel(param)
        ax.set_title(title, fontsize=9)
        if len(names) > 1 or others:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m causal_ie.report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="table + plots of a Hydra multirun directory")
    s.add_argument("sweep_dir", type=Path)
    s.add_argument("--metrics", nargs="*", default=None, help="flattened result keys to plot")
    args = parser.parse_args(argv)
    outputs = summarize(args.sweep_dir, args.metrics)
    for kind, path in outputs.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
