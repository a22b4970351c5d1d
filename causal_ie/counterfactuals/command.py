"""``run_counterfactuals(cfg)``: counterfactuals of a trained classifier on test images with a finding.

For every target finding, the first ``num_images`` test images that have it
(with its box) get one counterfactual per configured method. results.json
holds, per method, the mean measures over all (image, finding) pairs and per
finding; on data with a planted shortcut, also the share of the change on
the marker for the shortcut finding against the other findings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset, Subset

from causal_ie.counterfactuals.report import CounterfactualReport
from causal_ie.counterfactuals.svce import CounterfactualGenerator, CounterfactualResult, finding_indices
from causal_ie.explain.explainers import Explainer
from causal_ie.outputs.report import write_artefacts, write_report
from causal_ie.outputs.results import write_results
from causal_ie.precision import autocast, full_precision, parse_precision, search_autocast_dtype
from causal_ie.runs import check_compatible, load_classifier
from causal_ie.runtime import model_device, to_model

log = logging.getLogger(__name__)

SETTINGS = ("finding", "direction", "num_images", "figure_rows", "steps")
"""Keys of ``cfg.counterfactual`` that are settings of the run, not methods."""


@dataclass
class FindingPairs:
    """(image, finding) pairs to explain: images [P,C,H,W], finding [P], boxes and marker boxes [P,4]."""

    images: Tensor
    finding: Tensor
    boxes: Tensor
    marker_boxes: Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def select_pairs(dataset: Dataset, labels: np.ndarray, findings: list[int], per_finding: int) -> FindingPairs:
    """The first ``per_finding`` items of ``dataset`` that have each finding and a box for it."""
    items: dict[int, dict[str, Any]] = {}
    chosen: list[tuple[int, int]] = []
    for k in findings:
        taken = 0
        for i in np.flatnonzero(labels[:, k] > 0.5).tolist():
            if taken == per_finding:
                break
            if i not in items:
                items[i] = dataset[i]
            if torch.isfinite(items[i]["boxes"][k]).all():
                chosen.append((i, k))
                taken += 1
    if not chosen:
        raise ValueError("no test image has any of the target findings with a box: check counterfactual.finding and the data")
    nan_box = torch.full((4,), math.nan)
    return FindingPairs(
        images=torch.stack([items[i]["image"] for i, _ in chosen]),
        finding=torch.tensor([k for _, k in chosen]),
        boxes=torch.stack([items[i]["boxes"][k] for i, k in chosen]).float(),
        marker_boxes=torch.stack([items[i].get("spurious_box", nan_box) for i, _ in chosen]).float(),
        ids=[str(items[i]["id"]) for i, _ in chosen],
    )


def build_methods(cfg: DictConfig) -> dict[str, CounterfactualGenerator]:
    """One generator per method entry of ``cfg.counterfactual`` (an entry with a ``_target_``)."""
    methods = {
        name: instantiate(entry, name=name)
        for name, entry in cfg.items()
        if name not in SETTINGS and OmegaConf.is_dict(entry) and "_target_" in entry
    }
    if not methods:
        raise ValueError("no counterfactual method configured: choose one, e.g. counterfactual=svce or counterfactual=[svce,apgd]")
    return methods


def target_findings(finding: Any, names: tuple[str, ...]) -> list[int]:
    """``counterfactual.finding``: null (all), a name, or a list of names -> indices, checked."""
    if finding is None:
        return list(range(len(names)))
    wanted = [finding] if isinstance(finding, str | int) else list(finding)
    return finding_indices(wanted, len(wanted), names).tolist()


def _device(trainer: Any) -> torch.device:
    """The device ``trainer.accelerator`` / ``trainer.devices`` name (one device: this command runs
    in one process; ``devices: [2]`` is cuda:2)."""
    accelerator = str(trainer.get("accelerator", "cpu")).lower()
    devices = trainer.get("devices", 1)
    index = int(devices[0]) if OmegaConf.is_list(devices) or isinstance(devices, list | tuple) else None
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.accelerator={accelerator!r} but torch sees no CUDA GPU; use trainer=cpu")
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def _shortcut_finding(dataset: Dataset) -> str | None:
    """The finding a SyntheticCXR test split plants its marker with (None without one)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    spurious = getattr(base, "spurious", None)
    return spurious["finding"] if spurious else None


def _mean(values: Tensor) -> float:
    values = values.double()
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def summarise(result: CounterfactualResult, names: tuple[str, ...], shortcut: str | None) -> dict[str, Any]:
    """Means over all pairs, per finding, and the marker's share for the shortcut finding vs the rest."""
    measures = {
        "confidence_before": result.confidence_before,
        "confidence_after": result.confidence_after,
        "success_rate": torch.where(result.add, result.confidence_after > 0.5, result.confidence_after < 0.5).float(),
        **result.metrics,
    }
    has_marker = ~torch.isnan(result.metrics["marker_mass_share"])
    if not has_marker.any():
        measures.pop("marker_mass_share")

    def means(rows: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"n": int(rows.sum())}
        out.update({key: _mean(v[rows]) for key, v in measures.items()})
        if "marker_mass_share" in measures:
            out["n_with_marker"] = int((rows & has_marker).sum())
        return out

    everything = torch.ones_like(result.add)
    summary = means(everything)
    summary["per_finding"] = {names[k]: means(result.finding == k) for k in dict.fromkeys(result.finding.tolist())}
    if shortcut is not None and "marker_mass_share" in measures:
        on_shortcut = result.finding == names.index(shortcut)
        share = result.metrics["marker_mass_share"]
        summary["shortcut"] = {
            "finding": shortcut,
            "marker_mass_share": _mean(share[on_shortcut]),
            "marker_mass_share_other_findings": _mean(share[~on_shortcut]),
            "n_with_marker": int((on_shortcut & has_marker).sum()),
            "n_with_marker_other_findings": int((~on_shortcut & has_marker).sum()),
        }
    return summary


def _figure_rows(
    pairs: FindingPairs, results: dict[str, CounterfactualResult], names, direction: str, limit: int, shortcut: str | None
) -> list[dict]:
    """The first pair of each finding (up to ``limit``; the shortcut finding first) with every method's counterfactual."""
    before = next(iter(results.values())).confidence_before  # the same for every method
    findings = sorted(dict.fromkeys(pairs.finding.tolist()), key=lambda k: names[k] != shortcut)
    rows = []
    for k in findings[:limit]:
        i = int((pairs.finding == k).nonzero()[0])
        rows.append(
            {
                "pair": i,
                "image": pairs.images[i, 0].numpy(),
                "box": pairs.boxes[i].tolist(),
                "marker_box": pairs.marker_boxes[i].tolist(),
                "finding": names[k],
                "direction": direction,
                "before": float(before[i]),
                "counterfactuals": {
                    m: {"image": r.z[i, 0].float().numpy(), "after": float(r.confidence_after[i])} for m, r in results.items()
                },
            }
        )
    return rows


def _add_ce_maps(rows: list[dict], pairs: FindingPairs, classifier: torch.nn.Module, explainer: Explainer) -> None:
    """Each figure row's CE map of its finding (``row["ce"]``), to set beside the counterfactuals."""
    if not rows:
        return
    idx = torch.tensor([row["pair"] for row in rows])
    images = to_model(classifier, pairs.images[idx])
    with full_precision(images.device):  # a measurement (see causal_ie.precision)
        maps = explainer(classifier, images, torch.arange(len(rows)), pairs.finding[idx])
    for row, m in zip(rows, maps.detach().float().cpu().numpy()):
        row["ce"] = m


def run_counterfactuals(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the classifier and the test split, explain each target finding, write results.json + report.md."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    settings = cfg.counterfactual
    methods = build_methods(settings)
    if int(settings.num_images) < 1:
        raise ValueError(f"counterfactual.num_images must be >= 1, got {settings.num_images}")
    classifier, ckpt = load_classifier(cfg)
    # trainer.precision: *-true sets the weights' dtype; bf16-mixed runs the searches under bfloat16
    # autocast (16-mixed: float32, as float16 input gradients can underflow); every measurement
    # (confidences, CE maps) is taken with autocast off
    precision = cfg.trainer.get("precision", "32-true")
    weights_dtype, _ = parse_precision(precision)
    classifier = classifier.to(device=_device(cfg.trainer), dtype=weights_dtype)
    search_dtype = search_autocast_dtype(precision)
    datamodule = instantiate(cfg.data, _convert_="all")
    labels = check_compatible(classifier, datamodule, ckpt)  # the data now comes in the model's labels
    names = tuple(datamodule.findings)
    findings = target_findings(settings.get("finding"), names)
    missing = set(getattr(classifier, "missing_findings", ()))
    if settings.get("finding") is not None and missing & {names[k] for k in findings}:
        raise ValueError(
            f"counterfactual.finding: the classifier does not predict {sorted(missing & {names[k] for k in findings})}; "
            f"expected findings it predicts: {', '.join(n for n in names if n not in missing)}"
        )
    findings = [k for k in findings if names[k] not in missing]
    test = datamodule.dataset("test")
    pairs = select_pairs(test, datamodule.label_matrix("test"), findings, int(settings.num_images))
    shortcut = _shortcut_finding(test)
    missing = [names[k] for k in findings if k not in set(pairs.finding.tolist())]
    if missing:
        log.info("no test image has %s with a box: skipped", ", ".join(missing))
    log.info("%d (image, finding) pairs from the test split; methods %s", len(pairs), list(methods))

    per_method: dict[str, CounterfactualResult] = {}
    for name, method in methods.items():
        with autocast(search_dtype, model_device(classifier)):
            per_method[name] = method(
                classifier, pairs.images, pairs.finding, settings.direction, pairs.boxes, pairs.marker_boxes, names
            )
    summary = {name: summarise(r, names, shortcut) for name, r in per_method.items()}
    results = {
        "run": {
            "checkpoint": "none" if ckpt is None else str(ckpt),
            "data": datamodule.data_report(),
            "missing_findings": list(getattr(classifier, "missing_findings", ())),
            "labels": labels.report(),
            "image_size": datamodule.image_size,
            "backbone": classifier.hparams.backbone,
            "direction": settings.direction,
            "pairs": len(pairs),
            "shortcut": shortcut or "none",
            **{name: {"eps": method.eps, "p": method.p} for name, method in methods.items()},
        },
        "counterfactual": summary,
    }
    write_results(out_dir, results)
    rows = _figure_rows(pairs, per_method, names, settings.direction, int(settings.figure_rows), shortcut)
    if cfg.get("ce"):
        _add_ce_maps(rows, pairs, classifier, instantiate(cfg.ce, _convert_="all"))
    sections = [CounterfactualReport()]
    artefacts = {"counterfactual": {"rows": rows, "methods": list(methods), "direction": settings.direction}}
    figures = write_artefacts(out_dir, sections, results, artefacts)
    write_report(out_dir, results, sections, figures, title="causal-ie sparse visual counterfactuals")
    _print_summary(summary, out_dir)
    return results, {
        "pairs": pairs,
        "counterfactuals": per_method,
        "datamodule": datamodule,
        "figures": figures[CounterfactualReport.name],
        "figure_rows": rows,
    }


def _print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    for name, s in summary.items():
        line = (
            f"{name:>6}: y {s['confidence_before']:.3f} -> {s['confidence_after']:.3f}, "
            f"l0 {s['l0']:.0f}, l1.5 {s['l1_5']:.2f}, box share {s['box_mass_share']:.3f}"
        )
        if "shortcut" in s:
            sc = s["shortcut"]
            line += f", marker share {sc['finding']} {sc['marker_mass_share']:.3f} vs others {sc['marker_mass_share_other_findings']:.3f}"
        print(line)
    print(f"results: {out_dir / 'results.json'}\nreport:  {out_dir / 'report.md'}")
