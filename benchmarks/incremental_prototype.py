"""Incremental inference (issue #15) against plain batched forwards of the same perturbed images.

    python benchmarks/incremental_prototype.py [--configs resnet18:224:28:14 ...] [--threads 1 2]
        [--windows 64] [--batch-size 32] [--repeats 5] [--formats nchw cl] [--cuts auto 0.5]

Per configuration ``model:size:window:stride``: a Classifier (timm backbone behind the project's
Normalize, 1 channel, 14 findings, random weights with randomised BatchNorm statistics so that
every residual branch contributes), ``--images`` clean images, ``--windows`` sliding windows of
the grid spread over all positions (border windows included) and alternating between the images,
each set to the zero baseline. Per repetition the plain forward (``model(batch)``, eager, no_grad)
and the incremental forward (:class:`~causal_ie.interventions.incremental.IncrementalForward`) of
the same batches run in turn; ``ratio`` is the median over repetitions of plain time / incremental
time within a repetition (the machine is shared: ratios of the same repetition, not of medians of
different moments). ``nchw`` times both paths in the default memory format, ``cl`` both in
channels_last; ``ratio_vs_eager`` divides today's eager NCHW plain time by the incremental time.
The 1-minute load average (``/proc/loadavg``) is read before and after each configuration.

The one-off set-up (tracing, planning, the clean pass that fills the caches) is timed once and
not part of the ratio (column ``setup``): about one forward per clean image plus tracing. Results
are merged into benchmarks/results/incremental.json and .md, one row per setting (model, size,
window, threads, format, cut, N, batch size), this run's rows replacing older ones; ``--fresh``
starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from causal_ie.interventions.incremental import IncrementalForward, window_boxes
from causal_ie.interventions.windows import WindowGrid
from causal_ie.models import Classifier
from causal_ie.models.random_weights import randomise_batchnorm

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")




def make_model(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    model = Classifier(backbone=name, image_size=size).eval()
    randomise_batchnorm(model)
    return model


def spread(n_total: int, n: int) -> torch.Tensor:
    """``n`` window indices spread evenly over ``n_total`` (first and last included)."""
    if n >= n_total:
        return torch.arange(n_total)
    return torch.linspace(0, n_total - 1, n).round().long()


def run_config(name: str, size: int, window: int, stride: int, args: argparse.Namespace) -> list[dict]:
    model = make_model(name, size)
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(args.images, 1, size, size, generator=g)
    grid = WindowGrid.create((size, size), window, stride)
    widx = spread(len(grid), args.windows)
    image_idx = torch.arange(widx.numel()) % args.images
    boxes = window_boxes(grid, widx)
    perturbed = clean[image_idx].clone()
    for b, (r0, r1, c0, c1) in enumerate(boxes.tolist()):
        perturbed[b, :, r0:r1, c0:c1] = 0.0
    batches = [(s, min(s + args.batch_size, widx.numel())) for s in range(0, widx.numel(), args.batch_size)]
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for fmt in args.formats:
            memory_format = torch.channels_last if fmt == "cl" else torch.contiguous_format
            eager = model  # today's eager NCHW forward, timed beside every variant
            variant = make_model(name, size).to(memory_format=memory_format)
            x_variant = perturbed.contiguous(memory_format=memory_format)
            for cut in args.cuts:
                cut_value = cut if cut == "auto" else float(cut)
                load_before = load()
                with torch.no_grad():
                    start = time.perf_counter()
                    fwd = IncrementalForward(variant, clean.contiguous(memory_format=memory_format),
                                             cut_fraction=cut_value, memory_format=memory_format, verify=0)
                    info = fwd.describe(grid.window)
                    fwd(x_variant[:2], image_idx[:2], boxes[:2])  # plan + clean caches
                    setup_s = time.perf_counter() - start

                    def plain(m=variant, x=x_variant) -> torch.Tensor:
                        return torch.cat([m(x[a:b]) for a, b in batches])

                    def eager_nchw() -> torch.Tensor:
                        return torch.cat([eager(perturbed[a:b]) for a, b in batches])

                    def incremental(x=x_variant) -> torch.Tensor:
                        return torch.cat([fwd(x[a:b], image_idx[a:b], boxes[a:b]) for a, b in batches])

                    reference = eager_nchw()
                    diff = float((incremental() - reference).abs().max())
                    diff_plain = float((plain() - reference).abs().max())
                    times: dict[str, list[float]] = {"plain": [], "eager": [], "inc": []}
                    for _ in range(args.repeats):
                        for key, fn in (("plain", plain), ("inc", incremental), ("eager", eager_nchw)):
                            if key == "eager" and fmt == "nchw":
                                continue
                            t0 = time.perf_counter()
                            fn()
                            times[key].append(time.perf_counter() - t0)
                    if fmt == "nchw":
                        times["eager"] = times["plain"]
                load_after = load()
                ratios = [p / i for p, i in zip(times["plain"], times["inc"])]
                ratios_eager = [p / i for p, i in zip(times["eager"], times["inc"])]
                row = {
                    "model": name, "size": size, "window": window, "stride": stride, "threads": threads,
                    "format": fmt, "cut_fraction": cut, "perturbed": widx.numel(), "batch_size": args.batch_size,
                    "plain_s": statistics.median(times["plain"]), "inc_s": statistics.median(times["inc"]),
                    "eager_s": statistics.median(times["eager"]),
                    "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                    "ratio_vs_eager": statistics.median(ratios_eager),
                    "max_abs_diff": diff, "max_abs_diff_plain_variant": diff_plain,
                    "logit_scale": float(reference.abs().max()),
                    "setup_s": setup_s, "cut": info.get("cut", info.get("reason")),
                    "estimated_gain": info.get("estimated_gain"),
                    "cache_mb_per_image": info.get("cache_bytes_per_image", 0) / 2**20,
                    "load_before": load_before, "load_after": load_after,
                }
                rows.append(row)
                print(
                    f"{name} {size}px w{window}/s{stride} threads={threads} {fmt} cut={cut}: "
                    f"plain {row['plain_s']:.3f}s inc {row['inc_s']:.3f}s ratio {row['ratio']:.2f} "
                    f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}] vs eager {row['ratio_vs_eager']:.2f} "
                    f"est {row['estimated_gain'] or 0:.2f} diff {diff:.1e} (scale {row['logit_scale']:.2g}) "
                    f"load {load_before:.2f}/{load_after:.2f} | {row['cut']}",
                    flush=True,
                )
    return rows


KEY = ("model", "size", "window", "stride", "threads", "format", "cut_fraction", "batch_size", "perturbed")


def write(rows: list[dict], args: argparse.Namespace) -> None:
    """Results of this run merged into those on file (a row per setting; this run's win), unless --fresh."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
        "images": args.images, "repeats": args.repeats,
    }
    old = RESULTS / "incremental.json"
    if old.exists() and not args.fresh:
        mine = {tuple(r[k] for k in KEY) for r in rows}
        kept = [r for r in json.loads(old.read_text())["rows"] if tuple(r.get(k) for k in KEY) not in mine]
        rows = kept + rows
    tmp = RESULTS / "incremental.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(RESULTS / "incremental.json")
    lines = [
        "# Incremental inference vs plain forwards (issue #15)",
        "",
        f"{meta['machine']}, torch {meta['torch']}; {args.images} clean images; N perturbed inputs "
        "(zero-baseline windows spread over the grid, border windows included) in batches of bs; "
        f"median of {args.repeats} interleaved repetitions; ratio = plain / incremental time of the same "
        "repetition, same threads and memory format; 'vs eager NCHW' divides today's eager NCHW time. "
        "Load = 1-minute load average before/after (2 cores, shared with other jobs).",
        "",
        "| model | size | window/stride | threads | format | cut | N/bs | plain (s) | incremental (s) | "
        "ratio [min-max] | vs eager NCHW | est. | max abs diff | logit scale | setup (s) | load | cut lands |",
        "|---|---:|---|---:|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], -r["size"], r["batch_size"], r["threads"], r["format"])):
        lines.append(
            f"| {r['model']} | {r['size']} | {r['window']}/{r['stride']} | {r['threads']} | {r['format']} | "
            f"{r['cut_fraction']} | {r['perturbed']}/{r['batch_size']} | {r['plain_s']:.3f} | {r['inc_s']:.3f} | "
            f"{r['ratio']:.2f} "
            f"[{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | {r['ratio_vs_eager']:.2f} | "
            f"{r['estimated_gain'] or 0:.2f} | {r['max_abs_diff']:.1e} | {r['logit_scale']:.2g} | {r['setup_s']:.1f} | "
            f"{r['load_before']:.1f}/{r['load_after']:.1f} | {r['cut']} |"
        )
    tmp = RESULTS / "incremental.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(RESULTS / "incremental.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+",
                        default=["resnet18:224:28:14", "resnet18:128:16:8", "densenet121:224:28:14"])
    parser.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    parser.add_argument("--formats", nargs="+", default=["nchw", "cl"], choices=["nchw", "cl"])
    parser.add_argument("--cuts", nargs="+", default=["auto"])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="replace the results on file instead of merging")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        name, size, window, stride = config.split(":")
        rows += run_config(name, int(size), int(window), int(stride), args)
        if not args.no_write:
            write(rows, args)


if __name__ == "__main__":
    main()
