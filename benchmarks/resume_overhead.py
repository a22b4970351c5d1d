"""What saving the evaluation state costs: the default ``python evaluate.py attack=pgd``, timed
with the state saved (the defaults: every 10 batches, at the latest every 5 minutes, and at the
end of the test loop) and with ``evaluation.checkpoint_every=null`` (no saving), runs
alternating so that a machine busy with something else slows both alike. Median of 3 each, and
the saves' own seconds as the run logged them.

    python benchmarks/resume_overhead.py [--repeats 3] [overrides ...]

Results: benchmarks/results/resume_overhead.json and .md (atomically); run outputs under
outputs/benchmarks/resume_overhead/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from causal_ie.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SAVES = re.compile(r"evaluation state: (\d+) save\(s\) of process 0 took ([0-9.]+) s")


def run(out: Path, overrides: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "attack=pgd", f"hydra.run.dir={out}", *overrides],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"evaluate.py failed in {out}:\n{done.stderr[-3000:]}")
    log = (out / "evaluate.log").read_text() if (out / "evaluate.log").is_file() else done.stdout + done.stderr
    found = SAVES.search(log)
    return {"seconds": seconds, "saves": int(found.group(1)) if found else 0,
            "save_seconds": float(found.group(2)) if found else 0.0}


def times(runs: list[dict]) -> str:
    return ", ".join(f"{r['seconds']:.1f}" for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "resume_overhead")
    parser.add_argument("overrides", nargs="*", help="more evaluate.py overrides")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"saved": [], "not_saved": []}
    for i in range(args.repeats):
        for name, extra in (("saved", []), ("not_saved", ["evaluation.checkpoint_every=null"])):
            runs[name].append(run(args.out / f"{name}_{i}", [*args.overrides, *extra]))
            print(f"{name} {i}: {runs[name][-1]}", flush=True)
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    result = {
        "command": "python evaluate.py attack=pgd " + " ".join(args.overrides),
        "runs": runs,
        "median_s": median,
        "overhead_s": median["saved"] - median["not_saved"],
        "overhead_share": (median["saved"] - median["not_saved"]) / median["not_saved"],
        "save_seconds_median": statistics.median(r["save_seconds"] for r in runs["saved"]),
        "saves_per_run": runs["saved"][0]["saves"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    atomic_write_text(RESULTS / "resume_overhead.json", json.dumps(result, indent=2))
    md = [
        "# Saving the evaluation state: overhead on `python evaluate.py attack=pgd`", "",
        f"Median of {args.repeats} runs each, alternating; {os.cpu_count()} CPUs.", "",
        "| | median wall time (s) | runs (s) |", "|---|---|---|",
        *(f"| {name.replace('_', ' ')} | {median[name]:.1f} | {times(rs)} |" for name, rs in runs.items()),
        "",
        f"Difference of the medians: {result['overhead_s']:+.1f} s ({100 * result['overhead_share']:+.1f} %). "
        f"The saves themselves ({result['saves_per_run']} per run) took {result['save_seconds_median']:.3f} s "
        "in all (median over the runs), as the runs logged them.", "",
    ]
    atomic_write_text(RESULTS / "resume_overhead.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
