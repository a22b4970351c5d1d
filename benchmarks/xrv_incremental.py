"""CE on torchxrayvision's DenseNet-121 behind XRVClassifier: the incremental engine vs plain forwards.

    python benchmarks/xrv_incremental.py                     # input sizes 224 256 512 1024 (~15 min on 2 cores)
    python benchmarks/xrv_incremental.py --sizes 224 --repeats 1 --threads 1

The wrapper resizes [0, 1] images of any size to the network's 224 px (bilinear, antialiased)
and scales them to [-1024, 1024]; the incremental engine follows both (a resize maps a changed
box to the outputs whose weights reach into it). Per input size: one image's CE maps of all 18
labels (``causal_effect``: zero baseline, probabilities) with a window covering the same share of
the image at every size (32/224 of the side, stride half of it: 13 or 14 windows per side), by the default
engine (incremental) and by the same engine with ``intervention.incremental=false`` (plain
forwards), after one warm-up of each. Per repetition both run in turn (order alternating);
``ratio`` is the median over repetitions of plain / incremental time within one repetition
[min-max]; ``max abs map diff`` compares the two maps (the one-off set-up of each call, the
clean pass that fills the caches, is inside the incremental time).

The network has random weights (the released ones cost the same) with its head scaled so that
logits span about +-6, as the released models' do; raw random heads give logits in the hundreds
and saturated probabilities. Results go to benchmarks/results/xrv_incremental.json and .md
(written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causal_ie.interventions import InterventionSpec, WindowGrid, causal_effect  # noqa: E402
from causal_ie.interventions.incremental import IncrementalForward  # noqa: E402
from causal_ie.models import XRVClassifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DONE_WHEN = {224: 2.0, 256: 2.0, 512: 2.0, 1024: 2.0}  # issue #20: at least 2x the plain forwards, within 1e-5
TOLERANCE = 1e-5


def load() -> float:
    return os.getloadavg()[0]


def realistic_model() -> XRVClassifier:
    """Random DenseNet-121 whose logits on images like the benchmark's span about +-6."""
    torch.manual_seed(0)
    model = XRVClassifier(weights="random")
    with torch.no_grad():
        head = model.backbone.classifier
        logits = model(torch.rand(4, 1, 224, 224))
        head.weight.mul_(6.0 / float(logits.abs().max()))
        head.bias.zero_()
    return model


def run_size(model: XRVClassifier, size: int, args: argparse.Namespace) -> dict:
    window = max(1, round(size * 32 / 224))
    stride = max(1, window // 2)
    torch.manual_seed(size)
    clean = torch.rand(1, 1, size, size)
    grid = WindowGrid.create((size, size), window, stride)
    plan = IncrementalForward(model, clean).describe((window, window))
    specs = {
        "incremental": InterventionSpec(batch_size=args.batch_size),  # the default engine
        "plain": InterventionSpec(batch_size=args.batch_size, incremental=False),
    }
    before = load()
    with torch.no_grad():  # warm-up of both paths (tracing, kernel selection, allocations)
        for spec in specs.values():
            causal_effect(model, clean, window=window, stride=stride, spec=spec)
    times: dict[str, list[float]] = {name: [] for name in specs}
    maps: dict[str, torch.Tensor] = {}
    ratios = []
    for rep in range(args.repeats):
        for name in (list(specs) if rep % 2 else list(reversed(specs))):
            t = time.perf_counter()
            maps[name] = causal_effect(model, clean, window=window, stride=stride, spec=specs[name])
            times[name].append(time.perf_counter() - t)
        ratios.append(times["plain"][-1] / times["incremental"][-1])
        print(f"  {size} px rep {rep + 1}: plain {times['plain'][-1]:.2f} s, incremental "
              f"{times['incremental'][-1]:.2f} s, ratio {ratios[-1]:.2f}", flush=True)
    diff = float((maps["incremental"] - maps["plain"]).abs().max())
    return {
        "size": size, "window": window, "stride": stride, "windows": len(grid), "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "supported": plan.get("supported"), "reason": plan.get("reason", ""),
        "plain_s": statistics.median(times["plain"]), "incremental_s": statistics.median(times["incremental"]),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "max_abs_map_diff": diff, "map_scale": float(maps["plain"].abs().max()),
        "estimated_gain": plan.get("estimated_gain"), "cut": plan.get("cut", plan.get("reason")),
        "cache_mb_per_image": plan.get("cache_bytes_per_image", 0) / 2**20,
        "load_before": before, "load_after": load(), "done_when": DONE_WHEN.get(size), "repeats": args.repeats,
        "note": args.note,
    }


def write(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "note": args.note,
    }
    out.mkdir(parents=True, exist_ok=True)
    old = out / "xrv_incremental.json"
    if old.exists() and not args.fresh:  # this run's sizes replace older rows of the same size
        mine = {(r["size"], r["threads"]) for r in rows}
        kept = [r for r in json.loads(old.read_text())["rows"] if (r["size"], r["threads"]) not in mine]
        rows = sorted(kept + rows, key=lambda r: (r["threads"], r["size"]))
    tmp = out / "xrv_incremental.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(out / "xrv_incremental.json")
    lines = [
        "# Incremental inference on XRVClassifier (torchxrayvision DenseNet-121) vs its plain forwards (issue #20)",
        "",
        f"{meta['machine']}, {meta['date']}; one image's CE maps of all labels (causal_effect, zero baseline, "
        f"probabilities), window = 32/224 of the side, stride = window/2 (13 or 14 windows per side); the default engine "
        f"(incremental) vs the same with intervention.incremental=false (plain forwards), after one warm-up "
        f"each; {args.repeats} interleaved repetitions; ratio = plain / incremental time of the same "
        f"repetition, median [min-max]; random weights, head scaled to logits of about +-6.",
        "",
        "| input size | window/stride | windows/bs | threads | n | plain (s) | incremental (s) | ratio [min-max] | "
        "goal | est. | max abs map diff | map scale | cache/image | load | also running | cut lands |",
        "|---:|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        goal = f">= {r['done_when']:.0f}x: {'held' if r['ratio'] >= r['done_when'] else 'NOT held'}" if r["done_when"] else ""
        est = f"{r['estimated_gain']:.2f}" if r["estimated_gain"] else "-"
        lines.append(
            f"| {r['size']} | {r['window']}/{r['stride']} | {r['windows']}/{r['batch_size']} | {r['threads']} | {r['repeats']} | "
            f"{r['plain_s']:.2f} | {r['incremental_s']:.2f} | {r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | "
            f"{goal} | {est} | {r['max_abs_map_diff']:.1e} | {r['map_scale']:.2f} | "
            f"{r['cache_mb_per_image']:.0f} MB | {r['load_before']:.1f}/{r['load_after']:.1f} | {r.get('note', '')} | {r['cut']} |"
        )
    tmp = out / "xrv_incremental.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "xrv_incremental.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 512, 1024])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = realistic_model()
    rows = []
    for size in args.sizes:
        rows.append(run_size(model, size, args))
        r = rows[-1]
        print(f"{size} px: ratio {r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}], "
              f"max |map diff| {r['max_abs_map_diff']:.1e}", flush=True)
        write(rows, args, args.out)
    failed = [r["size"] for r in rows if r["max_abs_map_diff"] > TOLERANCE]
    if failed:
        raise SystemExit(f"incremental differs from plain forwards by more than {TOLERANCE} at sizes {failed}")


if __name__ == "__main__":
    main()
