"""Speed of the lp-ball ∩ box LMO and of Auto-Frank-Wolfe against APGD-L2 at an equal budget.

    python benchmarks/afw.py            # full settings
    python benchmarks/afw.py --small    # a minute on a laptop CPU

1. LMO: time per call against the dimension d (p = 1, 1.5, 2, inf); the
   sort makes it O(d log d), so ``time / (d log2 d)`` should stay flat.
2. Counterfactuals at an equal budget of forward+backward passes: AFW
   (p = 2 and p = 1.5), plain Frank-Wolfe (2/(t+2), p = 2) and APGD-L2
   (torchattacks) with the same l2 eps: wall time and the confidence
   reached. The model is a checkpoint (``--ckpt``, e.g. the best.ckpt of
   ``python train.py experiment=shortcut``) on SyntheticCXR images, removing
   each image's first finding, or without one a seeded tiny CNN on random
   images (raising one finding per image).

Writes ``benchmarks/results/afw.json`` (atomically) and ``afw.md``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from causal_ie.counterfactuals import SVCE, APGDCounterfactual, lp_ball_box_lmo
from causal_ie.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_lmo(dims: list[int], batch: int, repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for d in dims:
        g = torch.randn(batch, d, generator=gen)
        x = torch.rand(batch, d, generator=gen)
        eps = 0.05 * math.sqrt(d)  # a ball that binds and clips some coordinates at every d
        for p in (1.0, 1.5, 2.0, math.inf):
            seconds = median_time(lambda: lp_ball_box_lmo(g, x, eps, p), repeats)
            rows.append(
                {
                    "d": d,
                    "p": "inf" if math.isinf(p) else p,
                    "batch": batch,
                    "ms_per_call": 1e3 * seconds,
                    "ns_per_d_log2_d": 1e9 * seconds / (batch * d * math.log2(d)),
                }
            )
            print(f"LMO d={d:>7} p={p:>4}: {1e3 * seconds:8.2f} ms per batch of {batch}")
    return rows


def tiny_cnn(size: int) -> nn.Module:
    """A seeded ReLU CNN whose logits bend within the ball (weights scaled up), 14 outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * (size // 4) ** 2, 14),
    )
    with torch.no_grad():
        for w in list(model.parameters())[:6]:
            w.mul_(3.0)
    return model.eval()


def counterfactual_setup(ckpt: str | None, n_images: int, size: int):
    """(model, images, findings, direction, description)."""
    if ckpt is None:
        model = tiny_cnn(size)
        x = torch.rand(n_images, 1, size, size, generator=torch.Generator().manual_seed(1))
        return model, x, torch.arange(n_images) % 14, "add", f"seeded tiny CNN, random {size}px images"
    from causal_ie.data.synthetic import SyntheticCXR
    from causal_ie.models import Classifier

    model = Classifier.load(ckpt)
    size = int(model.hparams.image_size)
    data = SyntheticCXR(num_samples=20 * n_images, image_size=size, seed=2024)
    items = [it for it in (data[i] for i in range(len(data))) if it["labels"].sum() > 0][:n_images]
    x = torch.stack([it["image"] for it in items])
    findings = torch.tensor([int(it["labels"].nonzero()[0]) for it in items])
    return model, x, findings, "remove", f"{model.hparams.backbone} checkpoint {ckpt}, SyntheticCXR {size}px"


def bench_counterfactuals(ckpt: str | None, n_images: int, size: int, budgets: list[int], eps_l2: float, eps_l15: float) -> dict:
    model, x, findings, direction, description = counterfactual_setup(ckpt, n_images, size)
    print(f"counterfactuals: {description}, {len(x)} images, direction {direction}")
    rows = []
    for steps in budgets:
        methods = {
            "afw_l2": SVCE(eps=eps_l2, p=2.0, steps=steps),
            "fw_l2 (2/(t+2))": SVCE(eps=eps_l2, p=2.0, steps=steps, optimizer="fw"),
            "apgd_l2": APGDCounterfactual(eps=eps_l2, steps=steps),
            "afw_l1.5": SVCE(eps=eps_l15, p=1.5, steps=steps),
        }
        for name, method in methods.items():
            start = time.perf_counter()
            result = method(model, x, findings, direction)
            seconds = time.perf_counter() - start
            target = result.confidence_after if direction == "add" else 1 - result.confidence_after
            rows.append(
                {
                    "method": name,
                    "steps": steps,
                    "eps": method.eps,
                    "seconds": seconds,
                    "ms_per_image_step": 1e3 * seconds / (len(x) * steps),
                    "confidence_before": float(result.confidence_before.mean()),
                    "confidence_after": float(result.confidence_after.mean()),
                    "target_probability": float(target.mean()),
                    "target_log_probability": float(target.clamp_min(1e-12).log().mean()),
                    "l2": float(result.metrics["l2"].mean()),
                }
            )
            print(f"  {name:>16} steps={steps:>4}: {seconds:7.2f} s, y {rows[-1]['confidence_before']:.3f} -> {rows[-1]['confidence_after']:.3f}")
    return {"setup": description, "direction": direction, "images": len(x), "rows": rows}


def markdown(results: dict) -> str:
    lines = [
        "# Auto-Frank-Wolfe benchmark",
        "",
        f"`python benchmarks/afw.py {results['arguments']}` on {results['machine']} "
        f"(torch {results['torch']}, {results['threads']} thread(s)).",
        "",
        "## LMO (lp ball ∩ [0,1]^d): time per call",
        "",
        "| d | p | ms per batch | ns / (d log2 d) per image |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['d']} | {r['p']} | {r['ms_per_call']:.2f} | {r['ns_per_d_log2_d']:.2f} |" for r in results["lmo"]]
    cf = results["counterfactuals"]
    lines += [
        "",
        f"## Counterfactuals at an equal budget ({cf['setup']}; {cf['images']} images, {cf['direction']})",
        "",
        "Target probability: y_k for add, 1 - y_k for remove (mean over images; higher is better).",
        "",
        "| method | passes | eps | seconds | ms / (image·pass) | target probability | mean log target prob. | l2 of change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['steps']} | {r['eps']:g} | {r['seconds']:.2f} | {r['ms_per_image_step']:.2f} | "
        f"{r['target_probability']:.4f} | {r['target_log_probability']:.4f} | {r['l2']:.3f} |"
        for r in cf["rows"]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small settings (about a minute)")
    parser.add_argument("--ckpt", default=None, help="a train.py checkpoint (default: a seeded tiny CNN)")
    parser.add_argument("--eps-l2", type=float, default=1.0, help="l2 radius of AFW, FW and APGD (default 1)")
    parser.add_argument("--eps-l15", type=float, default=2.0, help="l1.5 radius of AFW (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings)")
    args = parser.parse_args()
    arguments = " ".join(sys.argv[1:])
    torch.set_num_threads(args.threads)
    if args.small:
        dims, batch, repeats, budgets, n_images = [1_000, 4_000, 16_000, 64_000], 4, 5, [10, 30], 8
    else:
        dims, batch, repeats, budgets, n_images = [1_000, 4_000, 16_000, 64_000, 256_000], 8, 7, [25, 100], 16
    results = {
        "arguments": arguments,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "lmo": bench_lmo(dims, batch, repeats),
        "counterfactuals": bench_counterfactuals(args.ckpt, n_images, 32, budgets, args.eps_l2, args.eps_l15),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "afw.json", results)
    atomic_write_text(RESULTS / "afw.md", markdown(results))
    print(f"wrote {RESULTS / 'afw.json'} and {RESULTS / 'afw.md'}")


if __name__ == "__main__":
    main()
