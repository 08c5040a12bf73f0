#!/usr/bin/env bash
# The offline GPU kit: everything a GPU node without network needs, and one command that turns
# about ten minutes on it into measurements and a GPU-scale ConML study (docs/gpu.md,
# docs/distributed.md "Air-gapped cluster").
#
#   bash benchmarks/gpu_kit.sh prepare     # a machine with network: the wheels the node lacks
#                                          # (benchmarks/gpu_node.txt lists what it has) into
#                                          # .gpu_kit/ (git-ignored), and its size (<= 64 MiB)
#   bash benchmarks/gpu_kit.sh run [--budget 540] [--out DIR] [--jobs 8] [--dry-run]
#                                          # the node: install .gpu_kit/ into a scratch folder
#                                          # (pip --no-index, no root), check every import, then
#                                          # the stages, each time-boxed, all within --budget s
#   bash benchmarks/gpu_kit.sh ingest DIR  # back on a normal machine: DIR into docs/gpu.md,
#                                          # docs/study/<name>/ and docs/results.md's section
#
# run's stages: install, imports, check (benchmarks/gpu_check.sh --quick: SDPA kernels with
# ConML's mask, fp32/bf16 steps/s, tokens/s, peak memory, ConML/plain, ZeRO-2 and DDP on one GPU,
# the bare PyTorch loop against the Trainer, and the step rate of --jobs study runs sharing the
# GPU), study (recipes/experiments/lr_paper_gpu_<rung>.yaml: the largest rung of 5k/10k/20k/40k/80k
# steps and as many paired seeds as the measured rate fits into the time left, run with
# `python -m icl_conml.experiment SPEC --jobs N`). A stage that fails or runs out of time is
# reported and the others still run. Everything lands in one folder (--out; default $OUT, else
# gpu_kit_out/): gpu.md, summary.json, log.txt, check.tar.gz, study.tar.gz, logs.tar.gz.
# --dry-run: every stage on CPU with a tiny model and a few steps (the report says DRY RUN).
# Options of run: --check_stages LIST (gpu_check.sh --only), --python PATH (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
SELF=$(pwd)/benchmarks/gpu_kit.sh

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_kit: error: $*" >&2; exit 2; }

KIT=${GPU_KIT_DIR:-.gpu_kit}
KIT_LIMIT_MIB=64
FILE_LIMIT_MIB=16
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
COMMAND=${1:-}
[[ -n "$COMMAND" ]] || { usage; exit 2; }
shift

prepare() {
    "$PYTHON" benchmarks/gpu_kit.py bundle --out "$KIT"
    local bytes files
    bytes=$(du -sb "$KIT" | cut -f1)
    files=$(find "$KIT" -name '*.whl' | wc -l)
    echo "gpu_kit: $KIT holds $files wheels, $((bytes / 1048576)) MiB ($bytes bytes; the limit is ${KIT_LIMIT_MIB} MiB)"
    ((bytes <= KIT_LIMIT_MIB * 1048576)) || die "$KIT is over ${KIT_LIMIT_MIB} MiB"
}

ingest() {
    [[ $# -ge 1 ]] || die "ingest takes the folder run wrote: bash benchmarks/gpu_kit.sh ingest DIR [--docs DOCS]"
    "$PYTHON" benchmarks/gpu_kit.py ingest "$@"
}

# stage NAME SECONDS COMMAND...: run COMMAND with at most SECONDS (less if the budget is nearly
# spent), and record its status in $WORK/stages.jsonl.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - RESERVE - SECONDS)) start=$SECONDS status=0 result
    if ((left < 15)); then
        printf '{"name": "%s", "status": "not run: the budget (%s s) was spent", "seconds": 0}\n' \
            "$name" "$BUDGET" >>"$WORK/stages.jsonl"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== gpu_kit: $name (at most ${limit} s; ${SECONDS} s elapsed)"
    timeout --kill-after=15 "$limit" "$@" || status=$?
    if ((status == 0)); then
        result=ok
    elif ((status == 124 || status == 137)); then
        result="stopped at its time limit (${limit} s)"
    else
        result="failed (exit $status; see log.txt)"
    fi
    echo "== gpu_kit: $name: $result ($((SECONDS - start)) s)"
    printf '{"name": "%s", "status": "%s", "seconds": %s}\n' "$name" "$result" "$((SECONDS - start))" \
        >>"$WORK/stages.jsonl"
}

install_kit() {
    local wheels=("$KIT"/*.whl)
    if [[ ! -e "${wheels[0]}" ]]; then
        echo "gpu_kit: no wheels in $KIT (run prepare on a machine with network): using the environment as it is"
    else
        "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
    fi
    # The project itself, no dependencies, no network: built with the interpreter's own setuptools
    # (the node's comes with torch); the runs use the repository's files either way (PYTHONPATH).
    if "$PYTHON" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .
    else
        echo "gpu_kit: this Python has no setuptools >= 77 to build the project offline: it runs from the repository"
    fi
}

# study SECONDS: plan the study for SECONDS of runs, run it, analyse what finished.
study() {
    local seconds=$1
    local plan_flags=(--rate "$WORK/check/rate.json" --jobs "$JOBS" --work "$WORK/study")
    if [[ "$DRY_RUN" == 1 ]]; then
        plan_flags+=(--max_pairs 1 --tiny '{n_embd: 32, n_layer: 2, n_head: 2, max_steps: 20, save_steps: 20, logging_steps: 10}')
    fi
    mkdir -p "$WORK/study"
    "$PYTHON" benchmarks/gpu_kit.py plan "${plan_flags[@]}" --seconds "$seconds" >"$WORK/plan.json"
    cat "$WORK/plan.json"
    local spec
    spec=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["node_spec"])' "$WORK/plan.json")
    local status=0
    # Runs that the time limit stops leave no record; the analysis below covers the finished ones.
    timeout --kill-after=20 "$seconds" "$PYTHON" -m icl_conml.experiment "$spec" --jobs "$JOBS" --no_analysis ||
        status=$?
    "$PYTHON" -m icl_conml.experiment "$spec" --analyze_only || echo "gpu_kit: the study's analysis failed"
    return "$status"
}

pack() {
    local records
    records=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("records_dir", ""))' \
        "$WORK/plan.json" 2>/dev/null || true)
    if [[ -d "$WORK/check" ]]; then
        tar -czf "$OUT/check.tar.gz" -C "$WORK/check" .
        # A check stopped before its report: the report of what it measured.
        [[ -f "$OUT/gpu.md" ]] || "$PYTHON" benchmarks/gpu_check.py report "$WORK/check" --report "$OUT/gpu.md" \
            --note "the check stopped before writing its report (see log.txt)" \
            $([[ "$DRY_RUN" == 1 ]] && echo --dry_run) >/dev/null || true
    fi
    if [[ -n "$records" && -d "$records" ]]; then
        cp "$WORK"/study/*.yaml "$records/" 2>/dev/null || true
        tar -czf "$OUT/study.tar.gz" -C "$records" .
    fi
    # The last 200 lines of every run's training log.
    if [[ -d "$WORK/study/runs" ]]; then
        (cd "$WORK/study/runs" && find . -name train.log -print0 | while IFS= read -r -d '' log; do
            mkdir -p "$WORK/logs/$(dirname "$log")" && tail -n 200 "$log" >"$WORK/logs/$log"
        done)
        [[ -d "$WORK/logs" ]] && tar -czf "$OUT/logs.tar.gz" -C "$WORK/logs" .
    fi
    "$PYTHON" benchmarks/gpu_kit.py summary --work "$WORK" --budget "$BUDGET" --seconds "$SECONDS" \
        --out "$OUT/summary.json" $([[ "$DRY_RUN" == 1 ]] && echo --dry_run) || true
}

run() {
    BUDGET=540
    OUT=${OUT:-gpu_kit_out}
    JOBS=8
    DRY_RUN=0
    CHECK_STAGES=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --budget) BUDGET=$2; shift ;;
            --out) OUT=$2; shift ;;
            --jobs) JOBS=$2; shift ;;
            --dry-run) DRY_RUN=1 ;;
            --check_stages) CHECK_STAGES=$2; shift ;;
            --python) PYTHON=$2; shift ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option $1 (see --help)" ;;
        esac
        shift
    done
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    [[ -z "$(ls -A "$OUT")" ]] || die "$OUT is not empty; give run an empty or new folder (--out)"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_kit.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    SITE=$WORK/site
    export PYTHONPATH="$SITE:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export KIT PYTHON WORK SITE JOBS DRY_RUN
    RESERVE=20   # packing the output folder
    ANALYSIS=40  # the study's analysis after its runs
    local check_budget=$((BUDGET * 4 / 9))  # 240 s of 540
    local check_flags=(--quick --keep "$WORK/check" --report "$OUT/gpu.md")
    if [[ "$DRY_RUN" == 1 ]]; then
        ((JOBS > 2)) && JOBS=2
        check_flags+=(--dry-run)
        export DS_ACCELERATOR=cpu BUDGET_DRY_RUN=$check_budget
    fi
    check_flags+=(--rate_jobs "$JOBS")
    [[ -n "$CHECK_STAGES" ]] && check_flags+=(--only "$CHECK_STAGES")
    exec > >(tee -a "$OUT/log.txt") 2>&1
    echo "gpu_kit: run, budget ${BUDGET} s, output $OUT, $(date -u '+%Y-%m-%d %H:%M:%S') UTC"
    stage install 120 bash "$SELF" _install
    stage imports 120 "$PYTHON" benchmarks/gpu_kit.py check $([[ "$DRY_RUN" == 1 ]] && echo --cpu)
    stage check $((check_budget + 90)) env BUDGET="$check_budget" PYTHON="$PYTHON" \
        bash benchmarks/gpu_check.sh "${check_flags[@]}"
    local left=$((BUDGET - RESERVE - SECONDS))
    stage study "$left" bash "$SELF" _study $((left - ANALYSIS))
    pack
    local big
    big=$(find "$OUT" -type f -size +"${FILE_LIMIT_MIB}"M)
    [[ -z "$big" ]] || echo "gpu_kit: WARNING: over ${FILE_LIMIT_MIB} MiB: $big"
    echo "gpu_kit: wrote $OUT ($(ls "$OUT" | wc -l) files) in ${SECONDS} s; on a normal machine: bash benchmarks/gpu_kit.sh ingest DIR"
}

case "$COMMAND" in
    prepare) prepare "$@" ;;
    run) run "$@" ;;
    ingest) ingest "$@" ;;
    _install) install_kit ;;  # run's stages (the environment comes from run)
    _study) study "$@" ;;
    -h|--help) usage ;;
    *) die "unknown command $COMMAND (prepare, run or ingest; see --help)" ;;
esac
