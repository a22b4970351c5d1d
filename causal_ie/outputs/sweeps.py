"""Sweep summaries: one row per run of a Hydra multirun, a table and plots per swept setting.

An experiment adds to a summary through a :class:`SweepExtension` (the attack
study's detection-transfer matrices are one); the entry point passes them in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import yaml

from causal_ie.io import atomic_write_text
from causal_ie.outputs.plots import plt, save_figure
from causal_ie.outputs.results import RESULTS_FILE, flatten
from causal_ie.outputs.tables import fold_intervals, is_interval_bound, is_missing, markdown_table

SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"


class SweepExtension(Protocol):
    """Something an experiment adds to a sweep summary."""

    def __call__(self, sweep_dir: Path, runs: pd.DataFrame, params: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
        """Write files into ``sweep_dir`` from the collected ``runs`` (``params``: the swept
        settings); return them (name -> path) and the summary.md lines that show them."""


def collect_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run of a multirun: its overrides (as columns) and flattened results.

    ``df.attrs["overrides"]`` lists the override keys. A run that wrote ``error.txt``
    instead of results has status ``failed``.
    """
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


def swept_settings(df: pd.DataFrame) -> list[str]:
    """The overrides whose value differs between runs (shared ones add nothing)."""
    overrides = [c for c in df.attrs.get("overrides", []) if c in df.columns]
    return [c for c in overrides if df[c].astype(str).nunique() > 1] or overrides[:1]


def summarize(
    sweep_dir: str | Path,
    metrics: Sequence[str] | None = None,
    extensions: Sequence[SweepExtension] = (),
) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary_<setting>.png`` into the sweep
    directory; ``metrics`` are the flattened result keys shown (those present; default: the
    first six), then each extension's files and lines.

    Both files show a value with a 95 % interval as one cell, ``0.832 [0.784, 0.875]``
    (:func:`causal_ie.outputs.tables.fold_intervals`): no ``_ci_low`` / ``_ci_high`` columns.
    summary.csv keeps every other value as results.json has it."""
    sweep_dir = Path(sweep_dir)
    df = collect_sweep(sweep_dir)
    overrides = [c for c in df.attrs.get("overrides", []) if c in df.columns]
    metric_cols = [c for c in df.columns if c not in overrides and c not in ("run", "status") and not is_interval_bound(c)]
    params = swept_settings(df)
    shown = [m for m in (metrics or ()) if m in df.columns] or metric_cols[:6]
    out = {"csv": sweep_dir / SUMMARY_CSV, "md": sweep_dir / SUMMARY_MD}
    # each run's own keys (the frame has NaN where a run lacks one), each interval in its value's cell
    folded = [fold_intervals({k: v for k, v in row.items() if not is_missing(v)}) for row in df.to_dict("records")]
    csv_columns = [c for c in df.columns if not is_interval_bound(c)]
    atomic_write_text(out["csv"], pd.DataFrame(folded, columns=csv_columns).to_csv(index=False))
    columns = ["run", *params, "status", *shown]
    lines = [f"# Sweep {sweep_dir.name}", "", markdown_table(columns, ([row.get(c) for c in columns] for row in folded))]
    for extension in extensions:
        files, extra = extension(sweep_dir, df, params)
        out.update(files)
        lines += extra
    atomic_write_text(out["md"], "\n".join(lines) + "\n")
    for param in params:
        values = pd.to_numeric(df[param], errors="coerce")
        if values.isna().all() or values.nunique() < 2:
            continue
        plot = plot_against(df.assign(_x=values), param, shown, sweep_dir / f"summary_{param}.png", params)
        if plot is not None:
            out[f"plot_{param}"] = plot
    return out


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


def plot_against(df: pd.DataFrame, param: str, metrics: Sequence[str], path: Path, params: Sequence[str]) -> Path | None:
    """Metrics against swept setting ``param`` (column ``_x``): one line per metric of a panel
    and per combination of the other swept settings."""
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
    return save_figure(fig, path)
