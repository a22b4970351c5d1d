"""Sliding-window CE of all 14 findings: this project's engine vs Captum Occlusion and plain forwards.

    python benchmarks/ce_vs_captum.py            # the full run: resnet18 + densenet121 at 64/128/224 px (~30 min)
    python benchmarks/ce_vs_captum.py --quick    # resnet18 at 64/128 px, one repeat (~3 min)
    python benchmarks/ce_vs_captum.py --sizes 224 --models resnet18 --modes exact approx --device cuda

Classifiers with random weights (eval, 1 channel, 14 findings; every BatchNorm gets
random statistics and affine parameters, as in the tests, since timm zero-initialises
the last BatchNorm of residual branches and would leave them silent), or trained
ones (``--weights resnet18=best.ckpt``); random images; window =
size/8, stride = window/2 (15 x 15 windows per image), baseline zero, outcome prob.
Per model and size:

- **modes** (``--modes``, default exact compiled approx): ``exact`` (the default
  engine: incremental inference, channels_last, inference mode), ``nchw`` (the
  same with NCHW tensors and no_grad, the engine before issue #15 part 2; not by
  default), ``compiled`` (``exact`` with ``engine.compile=true``; its compilation
  is a warm-up, excluded and reported), ``approx`` (each of ``--approx``: the
  opt-in approximate tier, :mod:`causal_ie.interventions.approx`);
- **effective roofline**: the time plain eager forwards (NCHW, no_grad: the forward
  before issue #15) of the same number of perturbed images would take, divided by
  the mode's time. Measured from ``--plain-batches`` batches of ``--batch-size``
  random images per repeat (a rate), interleaved with the modes;
- **speedup over Captum** ``Occlusion`` of all 14 findings: Captum needs one run per
  finding; it is timed on ``--captum-findings`` finding(s) of ``--captum-images``
  image(s) and scaled to 14 findings and ``--images`` images (said in the table);
- **max abs diff**: exact modes against Captum's map of the timed finding(s) and
  image(s); approximate modes: against the exact maps of all findings of
  ``--check-images`` images, the largest |difference| relative to each map's largest
  |value| and pointing-game agreement (share of maps whose maximum lies on a maximal
  pixel of the exact map; ``window``: within one window of it);
- **load**: the 1-minute load average (``/proc/loadavg``) at each timing of the mode,
  min-max, and before/after the model-size block (the machine is shared).

Each repeat runs the plain-forward probe and every mode in turn (rotated), so load
changes hit all alike; the reported time is the median over ``--repeats`` and the
ratios are medians of the per-repeat ratios [min-max]. Results go to
benchmarks/results/ce_vs_captum.json and .md (written atomically; ``--out``).
``--device cuda`` runs everything on the GPU (timings wait for the GPU).
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causal_ie.interventions import EngineSettings, InterventionSpec, WindowGrid, causal_effect  # noqa: E402
from causal_ie.interventions import fast  # noqa: E402
from causal_ie.interventions.approx import ApproxCheck, ApproxSettings, approximate_causal_effect  # noqa: E402
from causal_ie.intervals import wilson_ci  # noqa: E402
from causal_ie.models import Classifier  # noqa: E402
from causal_ie.models.random_weights import randomise_batchnorm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K = 14
MODES = ("exact", "nchw", "compiled", "approx")
DONE_WHEN = {  # issue #15: effective roofline of exact all-findings CE against the eager forward
    ("resnet18", 224): 2.5, ("resnet18", 128): 1.8, ("densenet121", 224): 2.0,
}


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so wall times measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load1() -> float:
    return os.getloadavg()[0]




def captum_maps(model, x, window: int, stride: int, ppe: int, findings) -> torch.Tensor:
    from captum.attr import Occlusion

    maps = []
    with torch.no_grad():
        for k in findings:
            occlusion = Occlusion(lambda z, k=k: model(z).sigmoid()[:, k])
            attr = occlusion.attribute(
                x, sliding_window_shapes=(1, window, window), strides=(1, stride, stride), baselines=0.0,
                target=None, perturbations_per_eval=ppe,
            )
            maps.append(attr[:, 0])
    return torch.stack(maps, dim=1)


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def bench(backbone: str, size: int, args) -> dict:
    device = torch.device(args.device)
    block_load = [load1()]
    torch.manual_seed(0)
    weights = dict(w.split("=", 1) for w in args.weights).get(backbone)
    if weights:  # trained weights (any size: global pooling), so the approximation check sees real maps
        model = Classifier.load(Path(weights)).eval().to(device)
    else:
        model = randomise_batchnorm(Classifier(backbone=backbone, image_size=size)).to(device)
    x = torch.rand(args.images, 1, size, size, generator=torch.Generator().manual_seed(size)).to(device)
    window = max(1, size // 8)
    stride = max(1, window // 2)
    grid = WindowGrid.create((size, size), window, stride)
    perturbed = args.images * len(grid)
    bs = args.batch_size
    spec = InterventionSpec(batch_size=bs)
    nchw = InterventionSpec(batch_size=bs, engine=EngineSettings(channels_last=False, inference_mode=False))
    compiled = InterventionSpec(batch_size=bs, engine=EngineSettings(compile=True))

    def ce(s: InterventionSpec, images=x):
        return lambda: causal_effect(model, images, window=window, stride=stride, spec=s)

    def approximate(name: str, images=x):
        approx = ApproxSettings.of(name, tau=args.tau, coarse=args.coarse, refine=args.refine)
        return lambda: approximate_causal_effect(model, images, window=window, stride=stride, approx=approx, spec=spec)

    runs = {}
    for mode in args.modes:
        if mode == "exact":
            runs["exact"] = ce(spec)
        elif mode == "nchw":
            runs["nchw"] = ce(nchw)
        elif mode == "compiled":
            runs["compiled"] = ce(compiled)
        elif mode == "approx":
            for name in args.approx:
                runs[f"approx:{ApproxSettings.of(name).name}"] = approximate(name)

    plain_images = torch.rand(args.plain_batches * bs, 1, size, size, generator=torch.Generator().manual_seed(1)).to(device)

    def plain() -> None:  # today's eager forward: NCHW, no_grad
        with torch.no_grad():
            for start in range(0, plain_images.shape[0], bs):
                model(plain_images[start:start + bs])

    # warm-up: tracing, caches, compilation (timed apart); the outputs are the maps compared below
    warmup, maps = {}, {}
    for name, fn in runs.items():
        compile_before = fast.compile_seconds()
        warmup[name], maps[name] = timed(fn, device)
        warmup[name] = {"seconds": warmup[name], "compile_s": fast.compile_seconds() - compile_before}
    plain()

    samples: dict[str, list[float]] = {name: [] for name in runs}
    loads: dict[str, list[float]] = {name: [] for name in runs}
    plain_s: list[float] = []
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.repeats):
        seconds_plain, _ = timed(plain, device)
        plain_s.append(seconds_plain)
        eager_for_all = perturbed * seconds_plain / plain_images.shape[0]
        rotated = order[r % len(order):] + order[:r % len(order)]
        for name in rotated:
            loads[name].append(load1())
            seconds, _ = timed(runs[name], device)
            samples[name].append(seconds)
            ratios[name].append(eager_for_all / seconds)
    eager_rate = plain_images.shape[0] / statistics.median(plain_s)

    # Captum on a subset, scaled to 14 findings and all images
    cx = x[: args.captum_images]
    findings = list(range(args.captum_findings))
    ppe_times = {}
    for ppe in args.captum_ppe:
        ppe_times[ppe], reference = timed(lambda ppe=ppe: captum_maps(model, cx, window, stride, ppe, findings), device)
    best_ppe = min(ppe_times, key=ppe_times.get)
    scale = (K / len(findings)) * (args.images / cx.shape[0])
    captum_s = ppe_times[best_ppe] * scale

    # approximate modes against the exact maps of --check-images images (all findings)
    check = None
    approx_names = [n for n in runs if n.startswith("approx:")]
    if approx_names and args.check_images:
        if weights:  # SyntheticCXR test images: a trained model's maps on the images it knows
            from causal_ie.data.sources import SyntheticDataModule

            data = SyntheticDataModule(image_size=size, augment=False, seed=12345, synthetic={
                "num_train": 4, "num_val": 4, "num_test": args.check_images})
            data.setup("test")
            test = data.dataset("test")
            cimg = torch.stack([test[i]["image"] for i in range(args.check_images)]).to(device)
        else:
            cimg = torch.rand(args.check_images, 1, size, size, generator=torch.Generator().manual_seed(size + 7)).to(device)
        exact_maps = ce(spec, cimg)()
        with torch.no_grad():
            predicted = model(cimg).sigmoid() >= 0.5
        check = {}
        for name in approx_names:
            approx = ApproxSettings.of(name.split(":", 1)[1], tau=args.tau, coarse=args.coarse, refine=args.refine)
            measure = ApproxCheck(approx)
            measure.update(approximate(name.split(":", 1)[1], cimg)(), exact_maps, (window, window), predicted)
            check[name] = measure.summary()
    block_load.append(load1())

    modes = {}
    for name in runs:
        t, t_lo, t_hi = median_range(samples[name])
        roof, roof_lo, roof_hi = median_range(ratios[name])
        entry = {
            "seconds": t, "seconds_min": t_lo, "seconds_max": t_hi, "samples": samples[name],
            "warmup_s": warmup[name]["seconds"], "compile_s": warmup[name]["compile_s"],
            "roofline": roof, "roofline_min": roof_lo, "roofline_max": roof_hi,
            "speedup_vs_captum": captum_s / t, "perturbed_per_s": perturbed / t,
            "load_1min": [min(loads[name]), max(loads[name])],
        }
        if name.startswith("approx:"):
            entry["error"] = (check or {}).get(name)
            exact_ref = maps.get("exact")
            if exact_ref is not None:
                entry["max_abs_diff_vs_exact"] = float((maps[name] - exact_ref).abs().max())
        else:
            ours = maps[name][: cx.shape[0], : len(findings)]
            entry["max_abs_diff"] = float((ours - reference).abs().max())
        modes[name] = entry
    main = modes.get("exact") or next(iter(modes.values()))
    result = {
        "backbone": backbone, "weights": weights or "random (random BatchNorm statistics)", "size": size, "device": str(device), "images": args.images, "window": window,
        "stride": stride, "windows_per_image": len(grid), "batch_size": bs,
        "plain_forward_images_per_s": eager_rate, "plain_samples_s": plain_s,
        "captum_s": captum_s, "captum_timed_s": ppe_times[best_ppe], "captum_perturbations_per_eval": best_ppe,
        "captum_findings_timed": len(findings), "captum_images_timed": int(cx.shape[0]), "captum_scale": scale,
        "load_average_1min": block_load, "modes": modes,
        # the exact mode at the top level (what benchmarks/gpu_check.sh reads)
        "ours_s": main["seconds"], "speedup": main["speedup_vs_captum"], "roofline": main["roofline"],
        "max_abs_diff": main.get("max_abs_diff", float("nan")),
        "target_roofline": DONE_WHEN.get((backbone, size)),
    }
    for name, m in modes.items():
        extra = (
            f"diff {m['max_abs_diff']:.1e}" if "max_abs_diff" in m
            else (f"rel err {m['error']['max_rel_error']:.3f} agree {m['error']['pointing_agreement']:.2f}"
                  if m.get("error") else "")
        )
        print(f"{backbone:>12} {size:>4} {name:<30} {m['seconds']:>8.2f}s roofline {m['roofline']:>5.2f} "
              f"[{m['roofline_min']:.2f}-{m['roofline_max']:.2f}] vs Captum {m['speedup_vs_captum']:>6.1f}x "
              f"{extra} load {m['load_1min'][0]:.1f}-{m['load_1min'][1]:.1f}"
              + (f" compile {m['compile_s']:.0f}s" if m["compile_s"] else ""), flush=True)
    return result


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    tf32 = "on" if env.get("cudnn_tf32") else "off"
    where = (
        f"{cfg['threads']} CPU threads ({env['processor']}, {env['cpu_count']} cores, shared)"
        if cfg.get("device", "cpu") == "cpu"
        else f"{env.get('gpu', cfg['device'])} (float32; TF32 convolutions {tf32})"
    )
    lines = [
        "# CE engine vs Captum Occlusion and plain forwards (all 14 findings)",
        "",
        f"Classifiers with random weights (random BatchNorm statistics) unless trained weights are named below, "
        f"{cfg['images']} random image(s) per size, "
        f"window = size/8, stride = window/2 (15 x 15 windows), baseline zero, outcome prob, batch size "
        f"{cfg['batch_size']}, {where}, torch {env['torch']}, captum {env['captum']}; median of "
        f"{cfg['repeats']} interleaved repeats. Roofline = time of plain eager NCHW forwards (today's forward) of the "
        f"same number of perturbed images / the mode's time (median of the per-repeat ratios [min-max]). "
        f"Captum Occlusion was timed on {cfg['captum_findings']} finding(s) of {cfg['captum_images']} image(s) and "
        "scaled to 14 findings and all images. Load: 1-minute load average while the mode ran (min-max). "
        "Approximate rows: error against the exact maps of all findings of "
        f"{cfg['check_images']} other image(s) (max |diff| / max |exact| per map, worst map; pointing agreement: "
        "share of maps whose maximum lies on a maximal pixel of the exact map, [95 % Wilson interval]; within one "
        "window).",
        "",
        "| model | size | mode | time (s) | roofline vs eager | speedup vs Captum x14 | max abs diff / error "
        "| pointing agreement (same pixel / window) | load | compile warm-up (s) |",
        "|---|---:|---|---:|---|---:|---|---|---|---:|",
    ]
    for r in report["results"]:
        for name, m in r["modes"].items():
            if "max_abs_diff" in m:
                err, agree = f"{m['max_abs_diff']:.1e} (vs Captum)", "-"
            elif m.get("error"):
                e = m["error"]
                err = f"{e['max_rel_error']:.3f} rel (mean {e['mean_rel_error']:.3f})"
                _, low, high = wilson_ci(round(e["pointing_agreement"] * e["maps"]), e["maps"])
                agree = (f"{e['pointing_agreement']:.2f} [{low:.2f}, {high:.2f}] / {e['window_agreement']:.2f} "
                         f"({e['maps']} maps)")
                if "predicted_pointing_agreement" in e:
                    agree += (f"; predicted findings {e['predicted_pointing_agreement']:.2f} / "
                              f"{e['predicted_window_agreement']:.2f} ({e['predicted_maps']})")
            else:
                err, agree = "-", "-"
            lines.append(
                f"| {r['backbone']} | {r['size']} | {name} | {m['seconds']:.2f} | {m['roofline']:.2f} "
                f"[{m['roofline_min']:.2f}-{m['roofline_max']:.2f}] | {m['speedup_vs_captum']:.1f}x | {err} | {agree} "
                f"| {m['load_1min'][0]:.1f}-{m['load_1min'][1]:.1f} | {m['compile_s']:.0f} |"
            )
    lines += ["", "Per model and size: plain eager forward rate, Captum time (timed, scaled), load before/after:", ""]
    for r in report["results"]:
        lines.append(
            f"- {r['backbone']} {r['size']} px: {r['plain_forward_images_per_s']:.1f} img/s eager; Captum "
            f"{r['captum_timed_s']:.1f} s timed x {r['captum_scale']:.0f} = {r['captum_s']:.0f} s (ppe "
            f"{r['captum_perturbations_per_eval']}); load {r['load_average_1min'][0]:.1f} -> {r['load_average_1min'][1]:.1f}"
            + (f"; done-when roofline >= {r['target_roofline']}" if r.get("target_roofline") else "")
            + f"; weights: {r['weights']}"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64/128 px, one repeat, small checks")
    parser.add_argument("--models", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--modes", nargs="+", default=["exact", "compiled", "approx"], choices=MODES)
    parser.add_argument("--approx", nargs="+", default=["bf16", "projective", "drilldown", "bf16+drilldown"])
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--coarse", type=int, default=2)
    parser.add_argument("--refine", type=float, default=0.3)
    parser.add_argument("--weights", nargs="*", default=[], metavar="BACKBONE=CHECKPOINT",
                        help="trained weights for a backbone (every size); its approximation check then runs on "
                             "SyntheticCXR test images")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--check-images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--plain-batches", type=int, default=2)
    parser.add_argument("--captum-ppe", type=int, nargs="+", default=[64])
    parser.add_argument("--captum-findings", type=int, default=1)
    parser.add_argument("--captum-images", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "ce_vs_captum.json")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes, args.repeats, args.check_images = ["resnet18"], [64, 128], 1, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU")

    import captum

    started = time.perf_counter()
    results = [bench(backbone, size, args) for backbone in args.models for size in args.sizes]
    report = {
        "config": {
            "models": args.models, "weights": args.weights, "sizes": args.sizes, "modes": args.modes, "approx": args.approx,
            "tau": args.tau, "coarse": args.coarse, "refine": args.refine, "images": args.images,
            "check_images": args.check_images, "batch_size": args.batch_size, "plain_batches": args.plain_batches,
            "captum_ppe_candidates": args.captum_ppe, "captum_findings": args.captum_findings,
            "captum_images": args.captum_images, "repeats": args.repeats, "threads": args.threads,
            "device": str(device), "quick": args.quick, "baseline": "zero", "outcome": "prob",
        },
        "environment": {
            "torch": torch.__version__,
            "captum": captum.__version__,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            **(
                {
                    "gpu": torch.cuda.get_device_name(device),
                    "cuda": torch.version.cuda,
                    "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                }
                if device.type == "cuda"
                else {}
            ),
        },
        "wall_s": time.perf_counter() - started,
        "targets": {"roofline_exact": {f"{b} {s}": v for (b, s), v in DONE_WHEN.items()},
                    "roofline_approx_224": 5.0, "pointing_agreement_approx": 0.95},
        "results": results,
    }
    write_atomically(args.out, json.dumps(report, indent=2) + "\n")
    write_atomically(args.out.with_suffix(".md"), markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
