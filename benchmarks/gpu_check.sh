#!/usr/bin/env bash
# GPU check, one GPU, under 8 minutes on an H200: the standard linear-regression recipe
# (recipes/linear_regression.yaml, 9.5M parameters, d = 20, 41 points: the curriculum's final
# size from step 0) in bf16, for STEPS steps, four ways:
#   plain        single process, conml_lambda 0
#   conml        single process, the paper's ConML (lambda 0.02)
#   zero2 plain  DeepSpeed ZeRO-2 (recipes/accelerate/zero2.yaml), 1 process, conml_lambda 0
#   zero2 conml  DeepSpeed ZeRO-2, 1 process, ConML
# and writes step time, samples/s, peak memory, model TFLOP/s and the fraction of the GPU's
# bf16 peak (989 TFLOP/s dense for an H200; --peak_tflops to change) to docs/gpu.md.
#
#   bash benchmarks/gpu_check.sh                  # on a GPU machine: measures, writes docs/gpu.md
#   bash benchmarks/gpu_check.sh --dry-run        # on CPU in seconds: the single-process rows
#                      with a tiny model for 3 steps, the ZeRO-2 commands printed, the report
#                      to a temporary file (or --report FILE)
# Options: --steps N (300), --warmup N (50), --report FILE, --peak_tflops X. PYTHON=... picks
# the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
STEPS=300
WARMUP=50
REPORT=""
PEAK=989
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --steps) STEPS=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --report) REPORT=$2; shift ;;
        --peak_tflops) PEAK=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

RECIPE=recipes/linear_regression.yaml
# The recipe's final prompt size from the first step (its curriculum starts at d=5, 11 points).
SIZE=(--curriculum_dims_start 20 --curriculum_points_start 41)
PRECISION=(--bf16 true)
REPORT_FLAGS=()
if [[ "$DRY_RUN" == 1 ]]; then
    STEPS=3
    WARMUP=1
    REPORT=${REPORT:-$WORK/gpu.md}
    SIZE=(--n_dims 5 --n_points 11 --n_positions 11 --curriculum_dims_start 5 --curriculum_points_start 11
          --n_embd 32 --n_layer 2 --n_head 2 --per_device_train_batch_size 8)
    REPORT_FLAGS=(--dry_run)
    export DS_ACCELERATOR=cpu
else
    REPORT=${REPORT:-docs/gpu.md}
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check.sh: no CUDA GPU visible; run with --dry-run to check the script on CPU" >&2
        exit 2
    fi
fi

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
COMMON=(--recipe "$RECIPE" --steps "$STEPS" --warmup "$WARMUP" --peak_tflops "$PEAK" --out_dir "$WORK")
ZERO2=("$PYTHON" -m accelerate.commands.launch --config_file recipes/accelerate/zero2.yaml
       --num_processes 1 --main_process_port "$PORT" benchmarks/gpu_check.py run "${COMMON[@]}" "${SIZE[@]}"
       "${PRECISION[@]}")
MISSING=()

# Single process: both rows in one Python process (a fresh model and Trainer each).
echo "== plain, conml (single process)" >&2
"$PYTHON" benchmarks/gpu_check.py run "${COMMON[@]}" "${SIZE[@]}" "${PRECISION[@]}" --row plain=0 --row conml=0.02

# ZeRO-2: one launch per row. A failed row is reported as such; the others still count.
if [[ "$DRY_RUN" == 1 ]]; then
    echo "== dry run: the ZeRO-2 rows would run (tested on CPU by tests/test_distributed.py):" >&2
    for row in "zero2 plain=0" "zero2 conml=0.02"; do
        printf ' %q' "${ZERO2[@]}" --row "$row" >&2
        echo >&2
    done
    MISSING=(--missing "dry run (command printed, not run)")
else
    for row in "zero2 plain=0" "zero2 conml=0.02"; do
        echo "== ${row%%=*}" >&2
        "${ZERO2[@]}" --row "$row" || echo "gpu_check.sh: ${row%%=*} failed" >&2
    done
fi

shopt -s nullglob
"$PYTHON" benchmarks/gpu_check.py report --report "$REPORT" "${REPORT_FLAGS[@]}" "${MISSING[@]}" "$WORK"/*.json
echo "gpu_check.sh: wrote $REPORT" >&2
