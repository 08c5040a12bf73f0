#!/usr/bin/env bash
# GPU check, one GPU, at most 8 minutes: the standard linear-regression model
# (recipes/linear_regression.yaml: 9.5M parameters, d = 20, 41 points, batch 64, at the
# curriculum's final size from step 0) measured five ways, written to docs/gpu.md:
#   kernels  which SDPA kernel a training step runs, plain and with ConML's additive mask, fp32
#            and bf16, and which backends (flash, efficient, cuDNN, math) accept the mask
#   single   steps/s, tokens/s, peak memory, model TFLOP/s: plain and ConML (lambda 0.02), in
#            fp32 and bf16, one process
#   zero2    the same in bf16 under DeepSpeed ZeRO-2 (accelerate launch, 1 process)
#   ddp      the same in bf16 under DDP (torchrun, 1 process)
#   learn    2 minutes of training with ConML in bf16 at the recipe's first curriculum stage:
#            the loss must fall
#   bare     the same model, prompts, loss and optimizer in a bare PyTorch loop (no Trainer),
#            fp32 and bf16: the Trainer's overhead
#   rate     (with --rate_jobs N) N runs of a study spec training at once on the one device
#            (arms alternating): steps/s per run, the number gpu_kit.sh plans its study with
# Each stage has a time limit and the whole stays within BUDGET seconds (440); a stage that
# fails or runs out of time is reported as such, the others still count.
# --quick is the offline kit's trimmed check (benchmarks/gpu_kit.sh): 150 steps (30 warm-up),
# shorter limits, no learn stage, all within BUDGET 240 s.
#
#   bash benchmarks/gpu_check.sh             # on a GPU machine: measures, writes docs/gpu.md
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU: every stage on a tiny model for a few
#                                            # steps, the report to a temporary file (or --report)
# Options: --steps N (300), --warmup N (50), --learn_seconds S (120), --report FILE, --quick,
# --keep DIR (keep the stages' JSON there), --rate_jobs N (0: no rate stage), --rate_spec SPEC,
# --only LIST (comma-separated stage names: run only those).
# PYTHON=... picks the interpreter; BUDGET=... the seconds for all stages (BUDGET_DRY_RUN: 900).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
STEPS=300
WARMUP=50
LEARN_SECONDS=120
REPORT=""
QUICK=0
KEEP=""
RATE_JOBS=0
ONLY=""
RATE_SPEC=recipes/experiments/lr_paper_gpu_20k.yaml
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --steps) STEPS=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --learn_seconds) LEARN_SECONDS=$2; shift ;;
        --report) REPORT=$2; shift ;;
        --quick) QUICK=1 ;;
        --keep) KEEP=$2; shift ;;
        --rate_jobs) RATE_JOBS=$2; shift ;;
        --rate_spec) RATE_SPEC=$2; shift ;;
        --only) ONLY=",$2,"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PYTHON=${PYTHON:-python}
LEARN_MARGIN=40  # start-up and model building around the learning check's training time
LEARN_LOGGING=100
# Time limits of the stages (seconds); --quick trims them and the steps.
L_KERNELS=90 L_SINGLE=150 L_BARE=60 L_ZERO2=110 L_DDP=90 L_RATE=90 RATE_SECONDS=40
if [[ "$QUICK" == 1 ]]; then
    BUDGET=${BUDGET:-240}
    STEPS=150 WARMUP=30
    L_KERNELS=45 L_SINGLE=75 L_BARE=30 L_ZERO2=60 L_DDP=45 L_RATE=90 RATE_SECONDS=20
fi
BUDGET=${BUDGET:-440}
if [[ -n "$KEEP" ]]; then
    mkdir -p "$KEEP"
    WORK=$(cd "$KEEP" && pwd)
else
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

RECIPE=recipes/linear_regression.yaml
RATE_TINY=()
# The recipe's final prompt size from the first step (its curriculum starts at d=5, 11 points).
SIZE=(--curriculum_dims_start 20 --curriculum_points_start 41)
LEARN_SIZE=()   # the recipe as it is: its first curriculum stage
DS_FLAGS=()
REPORT_FLAGS=()
if [[ "$DRY_RUN" == 1 ]]; then
    STEPS=3
    WARMUP=1
    LEARN_SECONDS=3
    REPORT=${REPORT:-$WORK/gpu.md}
    TINY=(--n_embd 32 --n_layer 2 --n_head 2 --per_device_train_batch_size 8)
    SIZE=(--n_dims 5 --n_points 11 --n_positions 11 --curriculum_dims_start 5 --curriculum_points_start 11 "${TINY[@]}")
    LEARN_SIZE=(--n_dims 5 --n_points 11 --n_positions 11 --curriculum_dims_start 3 --curriculum_points_start 7
                "${TINY[@]}")
    DS_FLAGS=(--use_cpu true)   # transformers allows bf16 on CPU only with use_cpu
    BUDGET=${BUDGET_DRY_RUN:-900}  # a busy CPU machine starts Python processes slowly
    LEARN_MARGIN=120
    LEARN_LOGGING=1
    REPORT_FLAGS=(--dry_run)
    RATE_SECONDS=3
    L_KERNELS=300 L_SINGLE=300 L_BARE=300 L_ZERO2=400 L_DDP=300 L_RATE=300  # the budget bounds them
    RATE_TINY=(--n_embd 32 --n_layer 2 --n_head 2)
    export DS_ACCELERATOR=cpu
else
    REPORT=${REPORT:-docs/gpu.md}
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check.sh: no CUDA GPU visible; run with --dry-run to check the script on CPU" >&2
        exit 2
    fi
fi

port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CHECK=(benchmarks/gpu_check.py)
RUN=(run --recipe "$RECIPE" --out_dir "$WORK" --steps "$STEPS" --warmup "$WARMUP")
NOTES=()

# stage NAME SECONDS COMMAND...: run COMMAND with at most SECONDS (less if the budget is nearly spent).
stage() {
    local name=$1 limit=$2
    shift 2
    if [[ -n "$ONLY" && "$ONLY" != *",$name,"* ]]; then
        NOTES+=(--note "$name: not run (--only ${ONLY:1:-1})")
        return 0
    fi
    local left=$((BUDGET - SECONDS))
    if ((left < 20)); then
        NOTES+=(--note "$name: not run, the time budget (${BUDGET} s) was spent")
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s; ${SECONDS} s elapsed)" >&2
    local status=0
    timeout --kill-after=10 "$limit" "$@" || status=$?
    if ((status == 124 || status == 137)); then
        NOTES+=(--note "$name: stopped at its time limit (${limit} s)")
    elif ((status != 0)); then
        NOTES+=(--note "$name: failed (exit $status, see the script's output)")
    fi
}

stage kernels "$L_KERNELS" "$PYTHON" "${CHECK[@]}" kernels --recipe "$RECIPE" --out_dir "$WORK" "${SIZE[@]}"
stage single "$L_SINGLE" "$PYTHON" "${CHECK[@]}" "${RUN[@]}" "${SIZE[@]}" \
    --row "fp32 plain=0@fp32" --row "fp32 conml=0.02@fp32" --row "bf16 plain=0@bf16" --row "bf16 conml=0.02@bf16"
stage bare "$L_BARE" "$PYTHON" "${CHECK[@]}" bare --recipe "$RECIPE" --out_dir "$WORK" --steps "$STEPS" \
    --warmup "$WARMUP" "${SIZE[@]}"
if ((RATE_JOBS > 0)); then
    stage rate "$L_RATE" "$PYTHON" "${CHECK[@]}" rate --spec "$RATE_SPEC" --jobs "$RATE_JOBS" \
        --seconds "$RATE_SECONDS" --out_dir "$WORK" "${RATE_TINY[@]}"
fi
stage ddp "$L_DDP" "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc_per_node 1 --master_addr 127.0.0.1 \
    --master_port "$(port)" "${CHECK[@]}" "${RUN[@]}" "${SIZE[@]}" --row "ddp plain=0@bf16" --row "ddp conml=0.02@bf16"
stage zero2 "$L_ZERO2" "$PYTHON" -m accelerate.commands.launch --config_file recipes/accelerate/zero2.yaml \
    --num_processes 1 --main_process_port "$(port)" "${CHECK[@]}" "${RUN[@]}" "${SIZE[@]}" "${DS_FLAGS[@]}" \
    --row "zero2 plain=0@bf16" --row "zero2 conml=0.02@bf16"
if [[ "$QUICK" == 1 ]]; then
    NOTES+=(--note "learn: not run by --quick (the offline kit's study trains past the plateau instead)")
else
    # The learning check gets what is left of the budget, up to LEARN_SECONDS of training.
    LEFT=$((BUDGET - SECONDS - LEARN_MARGIN))
    ((LEARN_SECONDS > LEFT)) && LEARN_SECONDS=$((LEFT > 10 ? LEFT : 10))
    stage learn $((LEARN_SECONDS + LEARN_MARGIN)) "$PYTHON" "${CHECK[@]}" learn --recipe "$RECIPE" --out_dir "$WORK" \
        --seconds "$LEARN_SECONDS" --logging_steps "$LEARN_LOGGING" "${LEARN_SIZE[@]}" --bf16 true --conml_lambda 0.02
fi

"$PYTHON" "${CHECK[@]}" report "$WORK" --report "$REPORT" --recipe "$RECIPE" --elapsed "$SECONDS" \
    "${REPORT_FLAGS[@]}" "${NOTES[@]}"
echo "gpu_check.sh: wrote $REPORT in ${SECONDS} s" >&2
