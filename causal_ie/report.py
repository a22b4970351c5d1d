"""Sweep summaries of evaluate.py: ``python -m causal_ie.report summarize <multirun dir>``.

Turns every run of a Hydra multirun into one row of a table (the swept
overrides beside the headline metrics), plots the metrics against each swept
setting and, for attack sweeps, adds the detection-transfer matrices. The
work is :func:`causal_ie.outputs.sweeps.summarize`; this module composes it
with the evaluation's sections (it is an entry point, so it may know them).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from causal_ie.attacks.report import AttackReport, DetectionTransfer
from causal_ie.explain.report import LocalisationReport
from causal_ie.outputs.sweeps import summarize

log = logging.getLogger(__name__)

HEADLINE = (*LocalisationReport.headline, *AttackReport.headline)


def summarize_evaluation(sweep_dir: str | Path, metrics: Sequence[str] | None = None) -> dict[str, Path]:
    """``summary.csv``, ``summary.md``, ``summary_<setting>.png`` and, where runs saved
    detection data, ``transfer[_<i>].csv/png`` in ``sweep_dir``."""
    return summarize(sweep_dir, metrics or HEADLINE, extensions=[DetectionTransfer()])


class SummarizeSweep(Callback):
    """Hydra callback: after a multirun of evaluate.py, write its summary (as
    ``python -m causal_ie.report summarize <sweep dir>`` does), so a sweep is one command."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            outputs = summarize_evaluation(sweep_dir)
        except Exception as err:  # noqa: BLE001 - the sweep's runs are done and saved; a summary is extra
            log.warning("no sweep summary for %s: %s", sweep_dir, err)
            return
        log.info("sweep summary: %s", outputs["md"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m causal_ie.report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="table + plots of a Hydra multirun directory")
    s.add_argument("sweep_dir", type=Path)
    s.add_argument("--metrics", nargs="*", default=None, help="flattened result keys to show and plot")
    args = parser.parse_args(argv)
    for kind, path in summarize_evaluation(args.sweep_dir, args.metrics).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
