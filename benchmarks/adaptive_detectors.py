"""Every detector under three attacks: non-adaptive, an attacker who knows the CE detector, and
one who knows every detector at once (the joint adaptive attacker).

    python benchmarks/adaptive_detectors.py --checkpoint outputs/train/.../checkpoints/best.ckpt
    python benchmarks/adaptive_detectors.py --checkpoint ROBUST.ckpt --label adversarially_trained
    python benchmarks/adaptive_detectors.py --merge adversarially_trained adversarially_trained_ce_only

One evaluate run (``attack=pgd attack.eps=0.008``, every built-in detector including ``lid``)
gives the non-adaptive scores and the per-image records; the adaptive study then runs twice on
the same records, ``against=ce`` and ``against=all``, on the same patients and seed. Beside it
the classifier's own robust accuracy at eps/2 (the same PGD with half the radius): Tramer 2022
shows a detector robust at eps implies a classifier robust at eps/2, the sanity bound for any
detection claim. Every number carries its 95 % patient-bootstrap interval. Results go to
benchmarks/results/adaptive_detectors[_<label>].json and .md (written atomically); run outputs
(results.json, report.md, figures) to --out. ``--merge`` joins the adaptive studies of runs made
separately (``--against ce`` in one session, ``all`` in another) into the first label's files; it
refuses runs whose checkpoint, attack or non-adaptive scores differ, since their images would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from causal_ie.attacks.outcome import attack_outcome  # noqa: E402
from causal_ie.evaluation import evaluate  # noqa: E402
from causal_ie.intervals import bootstrap_difference_ci, mean_ci, weighted_mean  # noqa: E402
from causal_ie.io import atomic_write_text  # noqa: E402
from causal_ie.outputs.tables import markdown_table, result_cell  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def config(checkpoint: Path, out: Path, test_images: int, adaptive_images: int, eps: float, extra: list[str]):
    GlobalHydra.instance().clear()
    overrides = [
        f"ckpt_path={checkpoint}", "attack=pgd", f"attack.eps={eps}", f"detection.test_images={test_images}",
        f"detection.adaptive.images={adaptive_images}", "+detector@detection.detectors.lid=lid",
        f"hydra.run.dir={out}", f"paths.output_dir={out}", *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=overrides, return_hydra_config=True)


def robust_accuracy(cfg, study, classifier, dataset, eps: float) -> dict[str, Any]:
    """Share of the test images whose attacked finding stays right under the same attack at
    radius ``eps`` (images the classifier gets wrong clean count as not robust), with its
    patient-bootstrap interval."""
    attack = instantiate(cfg.attack, eps=eps, _convert_="all")
    robust, groups = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=32)
    for batch in loader:
        images, labels = batch["image"], batch["labels"]
        with torch.no_grad():
            p_clean = classifier(images).sigmoid()
        adv = attack(classifier, images, labels, study.findings)
        with torch.no_grad():
            p_adv = classifier(adv.images).sigmoid()
        outcome = attack_outcome(adv, p_clean, p_adv, images)
        robust += ((outcome["eligible"] > 0) & ~(outcome["success"] > 0)).tolist()
        groups += [str(p or i) for p, i in zip(batch.get("patient_id", batch["id"]), batch["id"])]
    rate, low, high = mean_ci(np.asarray(robust, dtype=float), groups, n_boot=study.detection.n_boot,
                              seed=study.detection.seed)
    return {"eps": eps, "robust_accuracy": rate, "robust_accuracy_ci_low": low, "robust_accuracy_ci_high": high,
            "n": len(robust)}


def paired_evasion_difference(selective: dict[str, Any], orthogonal: dict[str, Any], detection: Any) -> dict[str, Any]:
    """evasion.all of the orthogonal attacker minus the selective one's, paired per image (both
    studies attack the same images in the same order), with its patient-bootstrap interval."""
    a, b = selective["per_image"], orthogonal["per_image"]
    if a["groups"] != b["groups"]:
        raise ValueError("the selective and orthogonal studies attacked other images: no paired difference")
    diff, low, high = bootstrap_difference_ci(
        lambda x, y, weights: weighted_mean(y, weights), lambda x, y, weights: weighted_mean(x, weights),
        a["groups"], np.asarray(a["evaded_all"], float), np.asarray(b["evaded_all"], float),
        n_boot=detection.n_boot, seed=detection.seed)
    return {"all": diff, "all_ci_low": low, "all_ci_high": high, "n": len(a["groups"])}


def table(result: dict[str, Any]) -> list[str]:
    # Either adaptive study may be missing (--against runs one of them); its columns then read n/a.
    empty = {"evasion": {}, "success_rate": float("nan"), "images": "?", "non_adaptive_evasion": {},
             "evasion_difference": {}}
    plain, ce_only = result["non_adaptive"], result.get("adaptive_ce", empty)
    joint = result.get("adaptive_all", empty)
    adaptive = joint if "adaptive_all" in result else ce_only
    rows = []
    for name, scores in plain.items():
        if not isinstance(scores, dict) or "auroc" not in scores or name == "changed_pairs":
            continue
        rows.append([name, *(result_cell(d.get(name, {}), key) for d in (plain, ce_only, joint)
                             for key in ("auroc", "tpr@5fpr")),
                     result_cell(ce_only["evasion"], name), result_cell(joint["evasion"], name)])
    rows.append(["all at once", "", "", "", "", "", "", result_cell(ce_only["evasion"], "all"),
                 result_cell(joint["evasion"], "all")])
    lines = [
        markdown_table(["detector", "AUROC non-adaptive", "TPR@5%FPR non-adaptive", "AUROC CE-only adaptive",
                        "TPR@5%FPR CE-only adaptive", "AUROC joint adaptive", "TPR@5%FPR joint adaptive",
                        "evasion CE-only adaptive", "evasion joint adaptive"], rows),
        "",
        f"Non-adaptive: {plain.get('images', '?')} {plain.get('pairs', '?')} pairs. Adaptive: "
        f"{adaptive['images']} clean images of unseen patients (success rate CE-only "
        f"{ce_only['success_rate']:.3f}, joint {joint['success_rate']:.3f}; pairs scored: "
        f"{ce_only.get('ce', {}).get('n_test', 'n/a')} CE-only, {joint.get('ce', {}).get('n_test', 'n/a')} joint). "
        "Evasion: share of the attacked images that reached the goal below the detector's 5 %-FPR threshold; "
        "'all at once': below every detector's. Non-adaptive evasion, all at once: "
        f"{result_cell(adaptive['non_adaptive_evasion'], 'all')}; CE-only minus non-adaptive: "
        f"{result_cell(ce_only['evasion_difference'], 'all')}; joint minus non-adaptive: "
        f"{result_cell(joint['evasion_difference'], 'all')}.",
        "",
        *orthogonal_lines(result),
        *clean_flag_lines(result),
        f"Robust accuracy at eps/2 = {result['robust']['eps']}: {result_cell(result['robust'], 'robust_accuracy')} "
        f"(n = {result['robust']['n']}).",
    ]
    return lines


def clean_flag_lines(result: dict[str, Any]) -> list[str]:
    """The false positives behind 'all at once': the study's clean images each detector flags."""
    flagged = result.get("clean_flagged") or result.get("adaptive_all", {}).get("clean_flagged")
    if not flagged:
        return []
    names = [k for k in flagged if k not in ("n", "any") and not k.endswith(("_ci_low", "_ci_high"))]
    return [f"Clean images of the adaptive study (n = {flagged['n']}) flagged at each detector's 5 %-FPR threshold: "
            f"by any detector {result_cell(flagged, 'any')} (the false positive rate behind 'all at once'); "
            + ", ".join(f"{n} {result_cell(flagged, n)}" for n in names) + ".", ""]


def orthogonal_lines(result: dict[str, Any]) -> list[str]:
    if "adaptive_all_orthogonal" not in result:
        return []
    o = result["adaptive_all_orthogonal"]
    lines = [f"Joint attacker with orthogonal PGD (same {o['images']} images, seed and schedule; success rate "
             f"{o['success_rate']:.3f}): evasion.all {result_cell(o['evasion'], 'all')}"]
    if "orthogonal_minus_selective" in result:
        lines[0] += (f"; orthogonal minus selective, paired per image: "
                     f"{result_cell(result['orthogonal_minus_selective'], 'all')}")
    rows = [[name, result_cell(result.get("adaptive_all", {}).get("evasion", {}), name), result_cell(o["evasion"], name)]
            for name in o["evasion"] if name != "n" and not name.endswith(("_ci_low", "_ci_high"))]
    return [lines[0] + ".", "", markdown_table(["detector", "evasion selective", "evasion orthogonal"], rows), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--merge", nargs="+", metavar="LABEL",
                        help="join these labels' adaptive studies into the first label's files; runs nothing")
    parser.add_argument("--label", default="default", help="names the result files (default model: 'default')")
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--adaptive-images", type=int, default=200)
    parser.add_argument("--eps", type=float, default=0.008)
    parser.add_argument("--against", nargs="*", default=["ce", "all"], choices=["ce", "all"],
                        help="the adaptive studies to run (CE-only, joint; none: no attack)")
    parser.add_argument("--clean-flags", action="store_true",
                        help="the share of the study's clean images each detector (and any) flags, without attacking")
    parser.add_argument("--orthogonal", action="store_true",
                        help="also run the joint study with orthogonal PGD on the same images, paired with selective")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "adaptive_detectors")
    parser.add_argument("overrides", nargs="*", help="more evaluate.py overrides")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge)
    if args.checkpoint is None:
        parser.error("--checkpoint is required unless --merge is given")
    out = args.out / args.label
    cfg = config(args.checkpoint.resolve(), out, args.test_images, args.adaptive_images, args.eps,
                 ["attack.adaptive=false", *args.overrides])
    started = time.time()
    results, objects = evaluate(cfg)
    timings = {"evaluate_s": time.time() - started}
    study = objects["module"].attack
    classifier = objects["module"].classifier
    dataset = objects["datamodule"].dataset("test")
    records = objects["module"].artefacts["attack"]["records"]
    result: dict[str, Any] = {"label": args.label, "checkpoint": str(args.checkpoint), "eps": args.eps,
                              "non_adaptive": results["detection"], "attack": results["attack"]}
    for against in args.against:
        started = time.time()
        adaptive = instantiate(cfg.detection.adaptive, against=against, _convert_="all")
        result[f"adaptive_{against}"] = adaptive.run(study, classifier, dataset, records)
        timings[f"adaptive_{against}_s"] = time.time() - started
    if args.clean_flags:
        adaptive = instantiate(cfg.detection.adaptive, against="all", _convert_="all")
        result["clean_flagged"] = adaptive.clean_flags(study, records)
    if args.orthogonal:
        started = time.time()
        adaptive = instantiate(cfg.detection.adaptive, against="all", orthogonal=True, _convert_="all")
        result["adaptive_all_orthogonal"] = adaptive.run(study, classifier, dataset, records)
        timings["adaptive_all_orthogonal_s"] = time.time() - started
        if "adaptive_all" in result:
            result["orthogonal_minus_selective"] = paired_evasion_difference(
                result["adaptive_all"], result["adaptive_all_orthogonal"], study.detection)
    started = time.time()
    result["robust"] = robust_accuracy(cfg, study, classifier, dataset, args.eps / 2)
    timings["robust_s"] = time.time() - started
    result["timings"] = timings
    result["machine"] = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
                         "torch": torch.__version__}
    write(result)


def stem(label: str) -> str:
    return "adaptive_detectors" if label == "default" else f"adaptive_detectors_{label}"


def write(result: dict[str, Any]) -> None:
    atomic_write_text(RESULTS / f"{stem(result['label'])}.json", json.dumps(result, indent=2, default=float))
    md = [f"# Detectors under non-adaptive and adaptive PGD (eps {result['eps']}), {result['label']} model", "",
          f"Checkpoint {result['checkpoint']}; {result['machine']['threads']} threads; times: "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result["timings"].items()), "", *table(result), ""]
    atomic_write_text(RESULTS / f"{stem(result['label'])}.md", "\n".join(md))
    print("\n".join(md))


def merge(labels: list[str]) -> None:
    """Joins the adaptive studies of separate runs on the same model into the first label's files."""
    paths = [RESULTS / f"{stem(label)}.json" for label in labels]
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--merge: no results file {path}")
    merged, *others = [json.loads(path.read_text()) for path in paths]
    for path, other in zip(paths[1:], others):
        for key in ("checkpoint", "eps", "attack", "non_adaptive"):
            if other[key] != merged[key]:
                raise SystemExit(f"--merge: {path} differs from {paths[0]} in '{key}'; its adaptive study "
                                 "ran on other images or another model")
        for key, study in other.items():
            if key.startswith("adaptive_") or key in ("clean_flagged", "orthogonal_minus_selective"):
                merged[key] = study
        merged["timings"].update({k: v for k, v in other["timings"].items() if k.startswith("adaptive_")})
    write(merged)


if __name__ == "__main__":
    main()
