#!/usr/bin/env bash
# The GPU path end to end, on one CUDA GPU, in under 8 minutes (issue #13):
#
#   1. train.py experiment=chexnet (DenseNet-121, 224 px) for one short epoch on SyntheticCXR
#      (model.pretrained=false: no network needed), under trainer.precision (bf16-mixed);
#   2. evaluate.py on that checkpoint, trainer=gpu, attack=pgd: CE maps, latent CE, CAMs,
#      deletion curves, the PGD attack study;
#   3. benchmarks/ce_vs_captum.py --device cuda at 224 px;
#   4. a results table (times, AUROC, attack success, CE-vs-Captum speedup and max |diff|, the
#      GPU, torch/CUDA versions) written to benchmarks/results/gpu_check.md and printed.
#
# Usage (from anywhere, the repository installed: pip install -e ".[dev]"):
#   benchmarks/gpu_check.sh                    # the GPU check
#   benchmarks/gpu_check.sh --dry-run          # the same steps on the CPU at 32 px (about 2-3 min on
#                                              # 2 cores): checks the script, not the GPU
#   GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh   # the same as --dry-run
# Settings (environment):
#   GPU_CHECK_DIR        where every output goes (default: a new directory under $TMPDIR or /tmp)
#   GPU_CHECK_PRECISION  trainer.precision of steps 1 and 2 (default bf16-mixed; 16-mixed, 32-true)
#   GPU_CHECK_OUT        the table (default benchmarks/results/gpu_check.md; dry run: $GPU_CHECK_DIR)
#   GPU_CHECK_WORKERS    data loader workers (default 8 on the GPU, 0 in the dry run)
#   GPU_CHECK_STEP_TIMEOUT  seconds before a step is stopped (default 480)
#   PYTHON               the interpreter (default: python)
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

dry_run=0
out="${GPU_CHECK_OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out="$2"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
device="${GPU_CHECK_DEVICE:-cuda}"
if [ "$dry_run" = 1 ]; then device=cpu; fi
case "$device" in
    cpu) dry_run=1 ;;
    cuda) ;;
    *) echo "gpu_check.sh: GPU_CHECK_DEVICE must be cuda or cpu, got $device" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-python}"
precision="${GPU_CHECK_PRECISION:-bf16-mixed}"
run="${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$run"
run="$(cd "$run" && pwd)"
step_timeout="${GPU_CHECK_STEP_TIMEOUT:-480}"
# every path the runs write (checkpoint search, autoencoder cache) under $run, not the repository
export CAUSAL_IE_ROOT="$run" CAUSAL_IE_CACHE="$run/cache"

if [ "$dry_run" = 1 ]; then
    # the code path of the GPU check, shrunk to what 2 CPU cores do in a couple of minutes: 32 px,
    # and the chexnet recipe on timm's small test_resnet instead of DenseNet-121
    size=32; trainer=cpu; workers="${GPU_CHECK_WORKERS:-0}"; model=(model.backbone=test_resnet)
    num_train=48; num_val=16; num_test=16; batches=3; test_subset=6
    mask=(mask.size=4 mask.stride=4); ce_batch=128
    captum=(--sizes 16 --images 1 --captum-ppe 64 --repeats 1 --batch-size 64 --threads 2)
    out="${out:-$run/gpu_check.md}"
else
    size=224; trainer=gpu; workers="${GPU_CHECK_WORKERS:-8}"; model=()
    num_train=512; num_val=64; num_test=32; batches=32; test_subset=16
    mask=(mask.size=28 mask.stride=14); ce_batch=256
    captum=(--sizes 224 --images 4 --captum-ppe 64 256 --repeats 3 --batch-size 256)
    out="${out:-$repo/benchmarks/results/gpu_check.md}"
    if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check.sh: torch sees no CUDA GPU; use --dry-run (or GPU_CHECK_DEVICE=cpu) to check the script on a CPU" >&2
        exit 1
    fi
fi

# the same data settings for training and evaluation (the checkpoint must fit the data)
data=(data=synthetic "data.image_size=$size" "data.num_workers=$workers" "data.synthetic.num_train=$num_train"
      "data.synthetic.num_val=$num_val" "data.synthetic.num_test=$num_test")
if [ "$dry_run" = 0 ]; then data+=(+data.pin_memory=true); fi
# training without progress bars (the logs go to files); evaluate keeps its own settings
quiet=(+trainer.enable_progress_bar=false '~callbacks.progress_bar' '~callbacks.model_summary')

declare -A seconds
current=""
on_error() {
    echo "gpu_check.sh: step '$current' failed; the last lines of $run/$current.log:" >&2
    tail -n 40 "$run/$current.log" >&2 || true
}
trap on_error ERR

step() {  # step NAME COMMAND...: run it with its output in $run/NAME.log, timed
    current="$1"; shift
    echo "== $current: $*" | tee "$run/$current.log"
    local start end
    start=$(date +%s.%N)
    if command -v timeout > /dev/null; then
        timeout "$step_timeout" "$@" >> "$run/$current.log" 2>&1
    else
        "$@" >> "$run/$current.log" 2>&1
    fi
    end=$(date +%s.%N)
    seconds[$current]=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    echo "   done in ${seconds[$current]} s"
}

echo "gpu_check: device $device, precision $precision, outputs in $run"
total_start=$(date +%s.%N)

step train "$py" train.py experiment=chexnet "${data[@]}" "${model[@]}" model.pretrained=false "trainer=$trainer" \
    "trainer.precision=$precision" trainer.max_epochs=1 "+trainer.limit_train_batches=$batches" \
    +trainer.limit_val_batches=2 test=false logger=csv "${quiet[@]}" "hydra.run.dir=$run/train"
ckpt="$run/train/checkpoints/best.ckpt"
[ -f "$ckpt" ] || { current=train; echo "gpu_check.sh: no checkpoint at $ckpt" >&2; exit 1; }

step evaluate "$py" evaluate.py "ckpt_path=$ckpt" "${data[@]}" "trainer=$trainer" "trainer.precision=$precision" \
    attack=pgd detection.pairs=all "data.test_subset=$test_subset" "${mask[@]}" "intervention.batch_size=$ce_batch" \
    "latent.intervention.batch_size=$ce_batch" evaluation.deletion_steps=10 logger=csv \
    "hydra.run.dir=$run/evaluate"

step captum "$py" benchmarks/ce_vs_captum.py --device "$device" "${captum[@]}" --out "$run/ce_vs_captum.json"

total_end=$(date +%s.%N)
total=$(awk -v a="$total_start" -v b="$total_end" 'BEGIN { printf "%.1f", b - a }')

if [ "$dry_run" = 0 ] && command -v nvidia-smi > /dev/null; then
    gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
else
    gpu="none (CPU dry run)"
fi

current=table
GPU_CHECK_RUN="$run" GPU_CHECK_GPU="$gpu" GPU_CHECK_TOTAL="$total" GPU_CHECK_PRECISION="$precision" \
GPU_CHECK_DRY="$dry_run" GPU_CHECK_TRAIN_S="${seconds[train]}" GPU_CHECK_EVAL_S="${seconds[evaluate]}" \
GPU_CHECK_CAPTUM_S="${seconds[captum]}" GPU_CHECK_SIZE="$size" GPU_CHECK_TEST_SUBSET="$test_subset" \
GPU_CHECK_MASK="${mask[*]}" "$py" - "$out" <<'PY' 2> "$run/table.log"
"""Write the results table of gpu_check.sh (markdown, and the same numbers as JSON beside it)."""
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

env = os.environ
run = Path(env["GPU_CHECK_RUN"])
out = Path(sys.argv[1])
train = json.loads((run / "train" / "train_metrics.json").read_text())["metrics"]
results = json.loads((run / "evaluate" / "results.json").read_text())
captum = json.loads((run / "ce_vs_captum.json").read_text())["results"][0]
attack, loc = results.get("attack", {}), results.get("localisation", {})
dry = env["GPU_CHECK_DRY"] == "1"
total = float(env["GPU_CHECK_TOTAL"])


def num(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


rows = [
    ("train.py experiment=chexnet, 1 short epoch", f"{env['GPU_CHECK_TRAIN_S']} s",
     f"validation mean AUROC {num(train.get('val/auroc_mean'))}, last training loss {num(train.get('train/loss'))}"),
    (f"evaluate.py attack=pgd ({results['classification']['num_images']} test images, {env['GPU_CHECK_MASK']})",
     f"{env['GPU_CHECK_EVAL_S']} s",
     f"test mean AUROC {num(results['classification']['auroc_mean'])}; PGD success rate "
     f"{num(attack.get('success_rate'))}, AUROC under attack {num(attack.get('auroc_mean'))}; "
     f"CE pointing game {num(loc.get('ce', {}).get('pointing_game'))}"),
    (f"ce_vs_captum.py at {captum['size']} px ({captum['images']} image(s) x {captum['windows_per_image']} windows)",
     f"{env['GPU_CHECK_CAPTUM_S']} s",
     f"CE {captum['ours_s']:.2f} s vs Captum x14 {captum['captum_s']:.2f} s: {captum['speedup']:.1f}x, "
     f"max abs diff {captum['max_abs_diff']:.1e}, roofline {captum['roofline']:.2f}"),
]
cuda = torch.version.cuda or "none"
cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
title = "GPU check" + (" -- CPU DRY RUN (checks the script; no GPU numbers)" if dry else "")
lines = [
    f"# {title}",
    "",
    f"`benchmarks/gpu_check.sh`{' --dry-run' if dry else ''}, {datetime.date.today().isoformat()}: "
    f"GPU {env['GPU_CHECK_GPU']}; torch {torch.__version__}, CUDA {cuda}, cuDNN {cudnn}; "
    f"Python {platform.python_version()}; trainer.precision={env['GPU_CHECK_PRECISION']}; "
    f"SyntheticCXR at {env['GPU_CHECK_SIZE']} px, {results['run']['backbone']} from scratch.",
    "",
    "| step | wall time | result |",
    "|---|---|---|",
    *[f"| {a} | {b} | {c} |" for a, b, c in rows],
    f"| total | {total:.1f} s ({total / 60:.1f} min) | {'within' if total < 480 else 'OVER'} the 8-minute budget |",
    "",
    "Wall times include starting Python and building the data. Outputs: " + str(run),
    "",
]
text = "\n".join(lines)
out.parent.mkdir(parents=True, exist_ok=True)
tmp = out.with_suffix(out.suffix + ".tmp")
tmp.write_text(text)
os.replace(tmp, out)
summary = {
    "dry_run": dry, "gpu": env["GPU_CHECK_GPU"], "torch": torch.__version__, "cuda": cuda, "cudnn": cudnn,
    "precision": env["GPU_CHECK_PRECISION"], "total_s": total,
    "train": {"seconds": float(env["GPU_CHECK_TRAIN_S"]), "val_auroc_mean": train.get("val/auroc_mean")},
    "evaluate": {"seconds": float(env["GPU_CHECK_EVAL_S"]), "auroc_mean": results["classification"]["auroc_mean"],
                 "attack_success_rate": attack.get("success_rate"), "attack_auroc_mean": attack.get("auroc_mean")},
    "ce_vs_captum": {"seconds": float(env["GPU_CHECK_CAPTUM_S"]), **captum},
}
out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
print(text)
print(f"written to {out} and {out.with_suffix('.json')}")
PY
