"""Sliding-window CE of all 14 findings: this project's engine vs Captum Occlusion.

    python benchmarks/ce_vs_captum.py [--sizes 64 128] [--images 4] [--batch-size 64] [--device cuda]

A resnet18 Classifier (random weights, eval, 1 channel, 14 findings); window =
size/8, stride = window/2, baseline zero, outcome prob. Per size it reports:

- ``ours_s``: one ``causal_effect`` call for all images and findings;
- ``captum_s``: Captum ``Occlusion`` once per finding (a forward returning
  sigmoid(z)[:, k]), with ``perturbations_per_eval`` the fastest of
  ``--captum-ppe`` (tuned on one finding, then all 14 timed);
- ``speedup`` = captum_s / ours_s, and the largest |difference| of the maps;
- ``roofline`` = our perturbed images per second / images per second of a plain
  ``model(x)`` at the same batch size (full batches, about as many images as we
  perturb): how
  close the engine gets to the cost of the forwards alone (our time includes the
  unperturbed reference forward).

Our run and the plain forwards take turns for ``--repeats`` rounds and the
fastest of each counts (the machine may be shared); Captum's 14 calls are timed
once. ``--device cuda`` runs everything on the GPU (timings wait for the GPU to
finish; float32, so convolutions use TF32 where torch allows it). Results go to
benchmarks/results/ce_vs_captum.json and .md (written atomically; ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from causal_ie.interventions import WindowGrid, causal_effect
from causal_ie.interventions.engine import even_batches
from causal_ie.models import Classifier

RESULTS = Path(__file__).resolve().parent / "results"
K = 14


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so wall times measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_best(functions: dict, repeats: int, device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Fastest wall time of each function over ``repeats`` rounds that run them in turn, so a
    change of load on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def plain_forwards(model, images: torch.Tensor, batches: list[tuple[int, int]]):
    """``model(x)`` over ``images`` cut into ``batches`` (ranges): the cost of the forwards alone."""

    def run() -> None:
        with torch.no_grad():
            for start, stop in batches:
                model(images[start:stop])

    return run


def captum_maps(model, x, window: int, stride: int, ppe: int, findings=range(K)) -> torch.Tensor:
    from captum.attr import Occlusion

    maps = []
    with torch.no_grad():
        for k in findings:
            occlusion = Occlusion(lambda z, k=k: model(z).sigmoid()[:, k])
            attr = occlusion.attribute(
                x,
                sliding_window_shapes=(1, window, window),
                strides=(1, stride, stride),
                baselines=0.0,
                target=None,
                perturbations_per_eval=ppe,
            )
            maps.append(attr[:, 0])
    return torch.stack(maps, dim=1)


def bench_size(size: int, args) -> dict:
    load_before = os.getloadavg()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Classifier(backbone="resnet18", image_size=size).eval().to(device)
    # drawn on the CPU, so the images are the same whatever the device
    x = torch.rand(args.images, 1, size, size, generator=torch.Generator().manual_seed(size)).to(device)
    window = size // 8
    stride = max(1, window // 2)
    n_windows = len(WindowGrid.create((size, size), window, stride))
    perturbed = args.images * n_windows

    def ours() -> torch.Tensor:
        return causal_effect(model, x, window=window, stride=stride, baseline="zero", batch_size=args.batch_size)

    # The engine forwards the N originals and the perturbed images in near-equal batches of at
    # most batch_size; the plain forwards use exactly those batches (the roofline), and full
    # batches of batch_size (for reference: CPU convolutions can be much faster at 60 than at 64).
    total = args.images + perturbed
    images = torch.rand(total, 1, size, size).to(device)
    plain = plain_forwards(model, images, even_batches(total, args.batch_size))
    full = (perturbed // args.batch_size) * args.batch_size
    plain_full = plain_forwards(model, images, [(a, a + args.batch_size) for a in range(0, full, args.batch_size)])
    ours_maps = ours()  # warm-up
    plain()
    seconds = interleaved_best({"plain": plain, "plain_full": plain_full, "ours": ours}, args.repeats, device)
    ours_s = seconds["ours"]
    forward_rate = total / seconds["plain"]

    ppe_times = {}
    for ppe in args.captum_ppe:
        captum_maps(model, x[:1], window, stride, ppe, findings=[0])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        captum_maps(model, x, window, stride, ppe, findings=[0])
        synchronize(device)
        ppe_times[ppe] = time.perf_counter() - start
    best_ppe = min(ppe_times, key=ppe_times.get)
    synchronize(device)
    start = time.perf_counter()
    reference = captum_maps(model, x, window, stride, best_ppe)
    synchronize(device)
    captum_s = time.perf_counter() - start

    result = {
        "size": size,
        "device": str(device),
        "images": args.images,
        "window": window,
        "stride": stride,
        "windows_per_image": n_windows,
        "batch_size": args.batch_size,
        "ours_s": ours_s,
        "captum_s": captum_s,
        "captum_perturbations_per_eval": best_ppe,
        "captum_one_finding_s_by_ppe": {str(k): v for k, v in ppe_times.items()},
        "speedup": captum_s / ours_s,
        "max_abs_diff": float((ours_maps - reference).abs().max()),
        "ours_perturbed_per_s": perturbed / ours_s,
        "ours_forwarded_per_s": total / ours_s,
        "plain_forward_images_per_s": forward_rate,
        "plain_forward_images_per_s_full_batches": full / seconds["plain_full"],
        "roofline": (perturbed / ours_s) / forward_rate,
        # 1-minute load average before and after: other work on the machine skews timings
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
    }
    print(
        f"{size:>5} {ours_s:>9.2f} {captum_s:>10.2f} {result['speedup']:>8.1f}x "
        f"{result['max_abs_diff']:>10.2e} {result['ours_perturbed_per_s']:>10.1f} "
        f"{forward_rate:>10.1f} {result['roofline']:>9.3f}",
        flush=True,
    )
    return result


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    env = report["environment"]
    tf32 = "on" if env.get("cudnn_tf32") else "off"
    where = (
        f"{report['config']['threads']} CPU threads ({env['processor']})"
        if report["config"].get("device", "cpu") == "cpu"
        else f"{env.get('gpu', report['config']['device'])} (float32; TF32 convolutions {tf32})"
    )
    lines = [
        "# CE engine vs Captum Occlusion (all 14 findings)",
        "",
        f"resnet18 Classifier (random weights), {report['config']['images']} images, window = size/8, "
        f"stride = window/2, baseline zero, outcome prob, batch size {report['config']['batch_size']}, "
        f"{where}, torch {env['torch']}, captum {env['captum']}.",
        "",
        "| size | ours (s) | Captum x14 (s) | speedup | max abs diff | ours perturbed img/s "
        "| plain forward img/s (same batches) | plain img/s (batches of exactly bs) | roofline |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['size']} | {r['ours_s']:.2f} | {r['captum_s']:.2f} (ppe {r['captum_perturbations_per_eval']}) "
            f"| {r['speedup']:.1f}x | {r['max_abs_diff']:.1e} | {r['ours_perturbed_per_s']:.1f} "
            f"| {r['plain_forward_images_per_s']:.1f} | {r['plain_forward_images_per_s_full_batches']:.1f} "
            f"| {r['roofline']:.3f} |"
        )
    lines += [
        "",
        "Targets: speedup >= 5x and roofline >= 0.9. Roofline = our perturbed images per second / "
        "images per second of plain forwards of the same batches the engine runs (its N unperturbed "
        "images count as overhead). Timings are the fastest of several runs; the machine may be shared "
        "(1-minute load average at start/end per size: "
        + ", ".join(
            f"{r['size']} px {r['load_average_1min'][0]:.1f}/{r['load_average_1min'][1]:.1f}"
            for r in report["results"]
        )
        + f", {report['environment']['cpu_count']} cores).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--captum-ppe", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "ce_vs_captum.json")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU")

    import captum

    print(f"{'size':>5} {'ours_s':>9} {'captum_s':>10} {'speedup':>9} {'max|diff|':>10} "
          f"{'ours img/s':>10} {'plain img/s':>10} {'roofline':>9}")
    results = [bench_size(size, args) for size in args.sizes]
    report = {
        "config": {
            "sizes": args.sizes,
            "images": args.images,
            "batch_size": args.batch_size,
            "captum_ppe_candidates": args.captum_ppe,
            "repeats": args.repeats,
            "threads": args.threads,
            "device": str(device),
            "backbone": "resnet18",
            "baseline": "zero",
            "outcome": "prob",
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
        "targets": {"speedup": 5.0, "roofline": 0.9},
        "results": results,
    }
    write_atomically(args.out, json.dumps(report, indent=2) + "\n")
    write_atomically(args.out.with_suffix(".md"), markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
