"""The keys of results.json and what they mean: the one place they are written down.

A schema is a tree of :class:`Key` leaves. Its keys are literal names or
patterns with placeholders: ``<T>`` a threshold number, ``<finding>``,
``<method>``, ``<detector>``, ``<statistic>`` any single key. A literal name
wins over a pattern. ``docs/results.md`` is rendered from these trees
(:func:`render_markdown`; a test keeps it current) and :func:`problems`
checks a results dict against them (tests run it on real runs, so a key that
is written but not described here fails).

Flattened keys join the levels with dots: ``localisation.ce.pointing_game``.
A :class:`Key` with ``interval=True`` may carry its 95 % interval beside it as
``<key>_ci_low`` / ``<key>_ci_high``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from causal_ie.outputs.tables import CI_SUFFIXES, markdown_table


@dataclass(frozen=True)
class Key:
    """A leaf of results.json: its JSON type(s) and meaning."""

    kind: type | tuple[type, ...]
    meaning: str
    interval: bool = False


Tree = Mapping[str, Union[Key, "Tree"]]

_PLACEHOLDER = re.compile(r"<([a-zA-Z_]+)>")
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"

# -- evaluate.py -----------------------------------------------------------------------------
RECONSTRUCTION: Tree = {
    "space": Key(str, "where the latent CE intervenes: activation (the layer's output) or autoencoder (its bottleneck)"),
    "reconstruction_l1": Key(float, "autoencoder only: mean |A - decode(encode(A))| over the training images"),
    "activation_l1": Key(float, "autoencoder only: mean |A|, the scale the reconstruction error compares to"),
}

DATA_REPORT: Tree = {
    "source": Key(str, "the data source (data=): synthetic, nih, chestmnist, vindr, rsna, siim or chexpert"),
    "root": Key(str, "data.root, the folder read"),
    "metadata_file": Key(str, "NIH and the DICOM sources (VinDr-CXR, RSNA, SIIM): the metadata (annotation) CSV read"),
    "image_folders": Key(list, "NIH: the image folders found (images/, images_001/images/, ...)"),
    "on_error": Key(str, "data.on_error: raise, or skip (and count) bad data"),
    "split": Key(str, "NIH: official lists, or patient-wise by seed; VinDr-CXR, RSNA, SIIM: image-wise by seed (no patient ids)"),
    "boxes_only": Key(list, "splits restricted to images with radiologist ground truth (data.test_boxes_only)"),
    "readers": Key(str, "VinDr-CXR: data.readers, how its 3 readers' boxes combine into a mask (any, majority)"),
    "views": Key(list, "RSNA, CheXpert: data.views, the views kept (PA, AP; CheXpert's L: lateral; '*': all)"),
    "uncertain": Key(str, "CheXpert: data.uncertain, what an uncertain (-1) label is: ignore (NaN, left out), ones, zeros"),
    "uncertain_labels": Key(int, "CheXpert: uncertain (-1) label entries among the images read"),
    "images_view_unknown": Key(int, "RSNA: listed images missing from torchxrayvision's DICOM headers table (no view)"),
    "images_other_views": Key(int, "RSNA: listed images of views not in data.views"),
    "images_listed": Key(int, "NIH and the DICOM sources: images the metadata lists"),
    "images_found": Key(int, "NIH and the DICOM sources: listed images present on disk"),
    "images_readable": Key(int, "NIH and the DICOM sources: present images that decoded"),
    "images_used": Key(int, "NIH and the DICOM sources: images in the splits"),
    "images_skipped": Key(int, "NIH and the DICOM sources: listed images not used (listed - readable)"),
    "skipped": {"<reason>": Key(int, "images skipped for this reason (missing image, unreadable image, unknown label, ...)")},
    "skipped_examples": {"<reason>": Key(list, "the first few file names skipped for this reason")},
    "splits": {
        "<split>": {
            "images": Key(int, "images in the split (train, val, test)"),
            "patients": Key(int, "NIH and the DICOM sources: patients in the split (VinDr: images)"),
            "with_boxes": Key(int, "NIH and the DICOM sources: images of the split with a radiologist box"),
            "images_before_subset": Key(int, "test: images before data.test_subset cut them"),
        }
    },
}

APPROX_ERROR: Tree = {
    "method": Key(str, "mask.approx: the approximations that ran (bf16, projective, drilldown, joined by +)"),
    "images": Key(int, "images whose exact map was computed too (mask.approx_check, the first ones; rank 0 under DDP)"),
    "maps": Key(int, "(image, finding) maps compared"),
    "max_rel_error": Key(float, "largest over maps of max |approximate - exact| / max |exact| of the map"),
    "mean_rel_error": Key(float, "mean over maps of the same ratio"),
    "pointing_agreement": Key(float, "share of maps whose maximum lies on a maximal pixel of the exact map"),
    "window_agreement": Key(float, "share of maps whose maximum lies within one window of the exact map's"),
    "predicted_maps": Key(int, "maps of findings the model predicts (probability >= 0.5)"),
    "predicted_pointing_agreement": Key(float, "pointing_agreement over those maps only (absent findings' maps are mostly noise)"),
    "predicted_window_agreement": Key(float, "window_agreement over those maps only"),
    "speedup": Key(float, "exact seconds per image / approximate seconds per image on the checked images"),
    "tau": Key(float, "projective: the projective-field threshold (share of a map's side)"),
    "coarse": Key(int, "drilldown: stage 1 computed every coarse-th window per axis"),
    "refine": Key(float, "drilldown: share of all windows recomputed exactly in stage 2"),
    "rounds": Key(int, "drilldown: most rounds of stage 3 (estimated windows under each map's maximum computed)"),
}

LABELS: Tree = {
    "model": Key(str, "the classifier's label space (nih14, xrv:<weights>, ...)"),
    "data": Key(str, "the data set's label space"),
    "scored": Key(list, "the model's labels the data annotates, aligned by name (aliases and merges): the scored ones"),
    "model_only": Key(list, "the model's labels the data does not annotate: explained and attacked, not scored"),
    "data_only": Key(list, "the data's labels the model does not predict: not scored"),
}

EVALUATION_RUN: Tree = {
    "checkpoint": Key(str, "the classifier's checkpoint or weights file (none: random weights)"),
    "data": DATA_REPORT,
    "missing_findings": Key(list, "findings the classifier does not predict (a pretrained model's gaps): not scored"),
    "labels": LABELS,
    "image_size": Key(int, "side of the square test images in pixels, the resolution of every map"),
    "mask": Key(str, "region kind of the main CE (patch, pixel, superpixel, latent), or none"),
    "backbone": Key(str, "the classifier's backbone (timm name, or xrv:<weights>)"),
    "<method>": {**RECONSTRUCTION, "approx_error": APPROX_ERROR},
}

LOCALISATION: Tree = {
    "pointing_game": Key(float, "share of maps whose maximum lies in the box (ties: the share of maximal pixels in it)", True),
    "energy_pointing_game": Key(float, "mean share of the map's positive mass inside the box"),
    "iobb@<T>": Key(float, "share of pairs whose predicted box (largest component of the map >= 0.5 after min-max normalisation) has IoBB > T (Wang et al. 2017)", True),
    "iou@<T>": Key(float, "share of pairs whose predicted box has IoU > T with the lesion box", True),
    "iobb_mean": Key(float, "mean IoBB of the predicted boxes"),
    "iou_mean": Key(float, "mean IoU of the predicted boxes"),
    "pairs": Key((int, float), "(image, finding) pairs scored"),
    "minus": {
        "<method>": {
            "pointing_game": Key(float, "CE methods only: this method's pointing game minus the other method's, same pairs", True),
            "iobb@<T>": Key(float, "CE methods only: the same difference of IoBB@T accuracies", True),
        }
    },
}

FAITHFULNESS: Tree = {
    "deletion_auc": Key(float, "area under the finding's probability as pixels are deleted in map order (lower: more faithful)"),
    "insertion_auc": Key(float, "area under the finding's probability as pixels are inserted in map order (higher: more faithful)"),
}

ATTACK: Tree = {
    "name": Key(str, "torchattacks attack (fgsm, bim, pgd, pgdl2, cw, apgd, square)"),
    "target": Key(str, "attacked findings: top (each image's most likely), all, or a finding name"),
    "mode": Key(str, "untargeted, or targeted:present / targeted:absent"),
    "eps": Key((float, int, type(None)), "perturbation radius in [0, 1] pixel units (L2 radius for L2 attacks)"),
    "norm": Key(str, "Linf or L2"),
    "success_rate": Key(float, "among eligible images, the share where the attack reached its goal", True),
    "eligible_images": Key(int, "images the attack could change (untargeted: attacked findings right on the clean image; targeted: not yet at the goal)"),
    "num_images": Key(int, "test images attacked"),
    "flip_rate": Key(float, "share of attacked (image, finding) predictions that changed at threshold 0.5"),
    "auroc_mean": Key(float, "mean AUROC over findings on the adversarial images", True),
    "auroc": {"<finding>": Key(float, "AUROC of the finding on the adversarial images", True)},
    "perturbation": {
        "linf": Key(float, "mean L-inf norm of adversarial - clean"),
        "l2": Key(float, "mean L2 norm of adversarial - clean"),
        "l0": Key(float, "mean share of pixels changed by more than 1e-6"),
    },
}

STATISTIC_SHIFT: Tree = {
    "clean_mean": Key(float, "mean of the statistic over the clean images' maps"),
    "adv_mean": Key(float, "mean over the adversarial images' maps"),
    "separation_auroc": Key(float, "AUROC of the statistic alone for adversarial vs clean (0.5: no difference)"),
}

DETECTOR_SCORES: Tree = {
    "auroc": Key(float, "detection AUROC over every selected pair, each scored out of sample (patient 2-fold cross-fit)", True),
    "tpr@5fpr": Key(float, "true positive rate at 5 % false positive rate, same scores", True),
    "n_test": Key(int, "image pairs scored"),
    "n_train": Key(int, "image pairs the smallest training half held"),
    "features": Key(int, "features per image the detector's estimator is fitted on"),
    "estimator": Key(str, "the clean-vs-adversarial classifier fitted on them: logistic or gbm"),
    "target": Key(str, "the detector's class (detection.detectors.<detector>._target_)"),
    "auroc_minus": {
        "<detector>": Key(float, "this detector (one that reads CE) minus a detector that does not, AUROC on the same pairs", True),
    },
}

DETECTION: Tree = {
    "pairs": Key(str, "which (clean, adversarial) pairs enter: successful (the attack reached its goal), changed or all"),
    "images": Key(int, "image pairs the detectors were fitted and scored on"),
    "repeats": Key(int, "cross-fits averaged per detector"),
    "skipped": Key(str, "why the detectors were not scored (too few pairs); their AUROC and TPR keys are then NaN"),
    "<detector>": DETECTOR_SCORES,
    "changed_pairs": {
        "<detector>": {
            "auroc": Key(float, "detection AUROC on the pairs the attack changed (successful or not)", True),
            "n_test": Key(int, "changed pairs scored"),
        }
    },
    "adaptive": {
        "against": Key(str, "what the adaptive attacker was set to attack: all, or one detector"),
        "attacked": Key(list, "the detectors the attacker differentiated through"),
        "not_attacked": Key(list, "selected detectors it could not differentiate through (still scored)"),
        "eot_samples": Key(int, "draws averaged per attacker step for randomised detectors"),
        "images": Key(int, "clean images attacked again by the adaptive attacker"),
        "success_rate": Key(float, "share of them where the adaptive attack still reached its goal"),
        "weights": Key(list, "the attacker's lambda schedule (loss - lambda * detector logit)"),
        "steps": Key(int, "PGD steps per lambda"),
        "selective": Key(bool, "selective steps: an image whose finding flipped steps on the detectors' logit alone"),
        "orthogonal": Key(bool, "orthogonal steps (Bryniarski et al. 2022): each step without its component along the other goal's gradient"),
        "evasion": {
            "n": Key(int, "clean images attacked adaptively"),
            "<detector>": Key(float, "share of them the adaptive attack took to its goal below the detector's 5 %-FPR threshold; all: below every selected detector's at once", True),
        },
        "non_adaptive_evasion": {
            "<detector>": Key(float, "the same share for the non-adaptive attack on the same images", True),
        },
        "evasion_difference": {
            "<detector>": Key(float, "adaptive minus non-adaptive evasion (paired patient bootstrap)", True),
        },
        "clean_flagged": {
            "n": Key(int, "clean images of the study"),
            "<detector>": Key(float, "share of the attacked images' clean versions the detector flags at its threshold (its false positive rate on them); any: flagged by at least one detector, the false positive rate behind evasion.all", True),
        },
        "per_image": {
            "groups": Key(list, "the patient of each adaptively attacked image, in the study's order"),
            "evaded_all": Key(list, "per image: 1 if the adaptive attack reached the goal below every detector's threshold (pairs two studies on the same images)"),
        },
        "<detector>": {
            "auroc": Key(float, "the detector (fitted on the other patients' non-adaptive pairs) on clean vs adaptive images", True),
            "tpr@5fpr": Key(float, "its true positive rate at 5 % false positive rate", True),
            "n_test": Key(int, "adaptive pairs scored (as detection.pairs selects them)"),
        },
    },
}

EVALUATION: Tree = {
    "run": EVALUATION_RUN,
    "classification": {
        "auroc_mean": Key(float, "mean AUROC over the findings on the test images", True),
        "auroc": {"<finding>": Key(float, "AUROC of the finding on the test images", True)},
        "num_images": Key(int, "test images classified"),
    },
    "localisation_pairs": Key(int, "(image, finding) pairs with a box that every explainer was scored on"),
    "localisation": {"<method>": LOCALISATION},
    "faithfulness": {"<method>": FAITHFULNESS},
    "attack": ATTACK,
    "ce_under_attack": {
        "classifier": {"focus_logit": STATISTIC_SHIFT},  # the control: the attacked finding's logit alone
        "<method>": {
            "<statistic>": STATISTIC_SHIFT,
            "correlation_with_clean": {"adv_mean": Key(float, "mean Pearson correlation of the adversarial map with the clean one")},
        }
    },
    "detection": DETECTION,
}

# -- python -m causal_ie.counterfactuals -------------------------------------------------------
COUNTERFACTUAL_MEASURES: Tree = {
    "n": Key(int, "(image, finding) pairs"),
    "confidence_before": Key(float, "mean probability of the target finding on the image"),
    "confidence_after": Key(float, "mean probability on the counterfactual"),
    "success_rate": Key(float, "share of counterfactuals that crossed 0.5 in the asked direction"),
    "l0": Key(float, "mean number of pixel values changed by more than 1e-3"),
    "l1": Key(float, "mean l1 norm of the change"),
    "l1_5": Key(float, "mean l1.5 norm of the change"),
    "l2": Key(float, "mean l2 norm of the change"),
    "box_mass_share": Key(float, "mean share of the change's mass inside the lesion box"),
    "marker_mass_share": Key(float, "mean share of the change's mass on the planted shortcut marker (images with one)"),
    "n_with_marker": Key(int, "pairs whose image carries the marker"),
}

COUNTERFACTUAL: Tree = {
    "run": {
        "checkpoint": Key(str, "the classifier's checkpoint or weights file (none: random weights)"),
        "data": DATA_REPORT,
        "missing_findings": Key(list, "findings the classifier does not predict: no counterfactuals for them"),
    "labels": LABELS,
        "image_size": Key(int, "side of the square images in pixels"),
        "backbone": Key(str, "the classifier's backbone"),
        "direction": Key(str, "remove or add the finding"),
        "pairs": Key(int, "(image, finding) pairs explained"),
        "shortcut": Key(str, "the finding a shortcut marker was planted with, or none"),
        "<method>": {"eps": Key((float, int), "radius of the method's lp ball"), "p": Key((float, int), "the p of the ball")},
    },
    "counterfactual": {
        "<method>": {
            **COUNTERFACTUAL_MEASURES,
            "per_finding": {"<finding>": COUNTERFACTUAL_MEASURES},
            "shortcut": {
                "finding": Key(str, "the finding the marker was planted with"),
                "marker_mass_share": Key(float, "share of the change on the marker, counterfactuals of that finding"),
                "marker_mass_share_other_findings": Key(float, "the same for the other findings' counterfactuals"),
                "n_with_marker": Key(int, "pairs of that finding whose image carries the marker"),
                "n_with_marker_other_findings": Key(int, "pairs of the other findings whose image carries it"),
            },
        }
    },
}

SCHEMAS: dict[str, Tree] = {"evaluate": EVALUATION, "counterfactuals": COUNTERFACTUAL}


# -- matching ---------------------------------------------------------------------------------
def _pattern(key: str) -> re.Pattern[str]:
    parts, last = [], 0
    for m in _PLACEHOLDER.finditer(key):
        parts.append(re.escape(key[last : m.start()]))
        parts.append(_NUMBER if m.group(1) == "T" else r".+")
        last = m.end()
    parts.append(re.escape(key[last:]))
    return re.compile("".join(parts) + r"\Z")


def _lookup(tree: Tree, key: str) -> tuple[str, Key | Tree] | None:
    """The schema entry for ``key``: the literal one, else the first pattern matching it."""
    if key in tree:
        return key, tree[key]
    for name, entry in tree.items():
        if "<" in name and _pattern(name).match(key):
            return name, entry
    return None


def _interval_base(tree: Tree, key: str) -> Key | None:
    for suffix in CI_SUFFIXES:
        if key.endswith(suffix):
            found = _lookup(tree, key[: -len(suffix)])
            if found and isinstance(found[1], Key) and found[1].interval:
                return found[1]
    return None


def problems(results: Mapping[str, Any], tree: Tree, prefix: str = "") -> list[str]:
    """What in ``results`` the schema does not describe: unknown keys, wrong types, a
    section where a value should be or the other way round. Empty when all is described."""
    found: list[str] = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        entry = _lookup(tree, key)
        if entry is None:
            base = _interval_base(tree, key)
            if base is None:
                found.append(f"{name}: not in the schema")
            elif not _is_number(value):
                found.append(f"{name}: an interval bound must be a number, got {value!r}")
            continue
        spec = entry[1]
        if isinstance(spec, Key):
            if isinstance(value, Mapping):
                found.append(f"{name}: expected a value ({spec.meaning}), got a section")
            elif not _has_kind(value, spec.kind):
                found.append(f"{name}: expected {_kind_name(spec.kind)}, got {type(value).__name__} {value!r}")
        elif not isinstance(value, Mapping):
            found.append(f"{name}: expected a section, got {type(value).__name__} {value!r}")
        else:
            found += problems(value, spec, name + ".")
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _has_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):  # JSON writes 1.0 as 1.0 but tolerate ints
        return True
    return isinstance(value, kinds) or (value is None and type(None) in kinds)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "int", float: "number", str: "string", bool: "bool", list: "list", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# -- documentation ----------------------------------------------------------------------------
def rows(tree: Tree, prefix: str = "") -> list[tuple[str, str, str]]:
    """(flattened key pattern, type, meaning) of every leaf, in schema order."""
    out = []
    for name, entry in tree.items():
        key = f"{prefix}{name}"
        if isinstance(entry, Key):
            meaning = entry.meaning + (" (95 % interval: `_ci_low`, `_ci_high`)" if entry.interval else "")
            out.append((f"`{key}`", _kind_name(entry.kind), meaning))
        else:
            out += rows(entry, key + ".")
    return out


def render_markdown() -> str:
    """docs/results.md: every results.json key of every command, with its type and meaning."""
    parts = [
        "# results.json",
        "",
        "Every run of `evaluate.py` and `python -m causal_ie.counterfactuals` writes `results.json` in",
        "its output directory, atomically. Keys below are flattened with dots (`localisation.ce.pointing_game`",
        "is `results['localisation']['ce']['pointing_game']`). Placeholders: `<T>` a threshold,",
        "`<finding>` a finding name, `<method>` an explainer (`ce`, `ce_latent`, a CAM) or counterfactual",
        "method, `<detector>` a detector, `<statistic>` a CE-map statistic, `<split>` train/val/test,",
        "`<reason>` why data was skipped. NaN is written where a value is undefined (an AUROC on a",
        "finding without positives, or that the classifier does not predict).",
        "",
        "Rendered from `causal_ie/outputs/schema.py`; edit it there.",
        "",
    ]
    for command, tree in SCHEMAS.items():
        title = "evaluate.py" if command == "evaluate" else f"python -m causal_ie.{command}"
        parts += [f"## `{title}`", "", markdown_table(["key", "type", "meaning"], rows(tree)), ""]
    return "\n".join(parts)

