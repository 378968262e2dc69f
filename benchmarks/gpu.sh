#!/usr/bin/env bash
# The CUDA path measured on a real accelerator, in one run of under 8 minutes:
#   1. training samples/s under bf16 autocast (`recstream bench --sections training`): frozen encoder,
#      top 2 layers, LoRA on them; all-MiniLM-L6-v2 and a random decoder of Qwen2-0.5B's shape
#   2. event -> user vector p50/p99 at 1,000 events/s, and the highest rate whose p99 stays <= 0.5 s
#   3. item encoding texts/s (new texts; re-embedding over the cached bottom) for both encoders
#   4. `recstream evaluate --strategies naive,ewc_replay` on ml-latest-small, against CPU figures if given
#   5. peak GPU memory of each (torch.cuda.max_memory_allocated; null on a CPU)
#
#   benchmarks/gpu.sh OUT [--device cuda|cpu] [--tiny] [--data DIR] [--cpu-reference FILE]
#
# OUT receives one JSON per step, their logs, and gpu.json (every section) with a table printed
# at the end. Every step has its own time limit (their sum is under 8 minutes on the GPU;
# LIMIT_SCALE=N in the environment multiplies them, 4 by default with --device cpu); a step that
# fails or runs out of time leaves what it measured plus its error, and the next step runs.
#
# --tiny with --device cpu is the rehearsal (tests/test_gpu_script.py): every step at tiny sizes.
# --data: a MovieLens ml-latest-small folder (default ../shared/data/movielens-latest-small, then
#   shared/data/movielens-latest-small). --cpu-reference: the results JSON of the same evaluation
#   on a CPU (`recstream evaluate --events E --items I --out cpu.json --blocks 10
#   --strategies naive,ewc_replay --device cpu` on the files `recstream convert movielens` makes);
#   NDCG/Recall differences beyond 0.01 are flagged.
#
# On a lent GPU machine (the `device` tool runs a command in a copy of this working tree; nothing
# outside that machine can be reached, so nothing is installed there) the script needs a venv at
# .venv with this project's dependencies and a CUDA build of torch, and stops with a message when
# there is none. The tool carries ignored paths along (carry [".venv"]), but only 64 MiB in all:
# a torch venv (about 6 GB) has to be on the machine already. Untracked files that git does not
# ignore travel with the tree: copy ml-latest-small (3 MB) and the CPU reference into it first
# (../shared is not copied), then run as the tool's command, with timeout_s 540:
#   bash benchmarks/gpu.sh $OUT/gpu --device cuda --data gpu-data/ml-latest-small \
#       --cpu-reference gpu-data/cpu-reference.json
# and the files come back from $OUT/gpu (gpu.json holds every section).
set -uo pipefail

usage() { echo "usage: benchmarks/gpu.sh OUT [--device cuda|cpu] [--tiny] [--data DIR] [--cpu-reference FILE]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DEVICE=cuda; TINY=(); DATA=""; CPU_REFERENCE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:-}; shift 2 ;;
        --tiny) TINY=(--tiny); shift ;;
        --data) DATA=$(realpath "${2:-}"); shift 2 ;;
        --cpu-reference) CPU_REFERENCE=(--cpu-reference "$(realpath "${2:-}")"); shift 2 ;;
        *) usage ;;
    esac
done
[ "$DEVICE" = cuda ] || [ "$DEVICE" = cpu ] || usage

mkdir -p "$OUT"
OUT=$(realpath "$OUT")
rm -f "$OUT"/{decoder,training-minilm,training-qwen2,freshness,encoding,evaluate,gpu}.json  # no earlier run's figures
# stop MESSAGE: nothing can be measured; OUT/gpu.json says why (plain text, no venv needed).
stop() {
    echo "benchmarks/gpu.sh: $1" >&2
    local line=${1//$'\n'/ }
    printf '{"schema": "recstream-gpu/1", "device": "%s", "error": "%s"}\n' "$DEVICE" "${line//\"/\'}" >"$OUT/gpu.json"
    exit 3
}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "" 2>/dev/null; then
    stop "no usable venv at $ROOT/.venv. This script installs nothing (a GPU machine reaches no package
  index): bring a venv with this project's dependencies and a CUDA build of torch to .venv, then run it again."
fi
PYTHON=$ROOT/.venv/bin/python
# The tree's own packages, wherever the venv's editable install pointed when it was made.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ! import_error=$("$PYTHON" -c "import torch, transformers, avalanche, peft, kafka, stream, learners" 2>&1); then
    stop "the venv at .venv cannot import the project's dependencies ($(echo "$import_error" | tail -n 1)):
  install them into it (pip install -e '.[test]') where a package index is reachable"
fi
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    stop "--device cuda but torch sees no CUDA device (a CPU build of torch, or no GPU): use --device cpu"
fi
if [ -z "$DATA" ]; then
    for candidate in ../shared/data/movielens-latest-small shared/data/movielens-latest-small; do
        [ -f "$candidate/ratings.csv" ] && DATA=$candidate && break
    done
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/recstream-gpu-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
MINILM=$("$PYTHON" -c "from stream.config import default_model_path; print(default_model_path())")
DECODER=$WORK/qwen2-0.5b-random
started=$SECONDS

# The limits fit the GPU machine; a CPU rehearsal (2 shared cores) gets LIMIT_SCALE times as long.
LIMIT_SCALE=${LIMIT_SCALE:-$([ "$DEVICE" = cpu ] && echo 4 || echo 1)}

# step NAME LIMIT_S COMMAND...: runs under its limit, logs to OUT/NAME.log; a failure is recorded in OUT/NAME.json.
step() {
    local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
    echo "== $name (limit ${limit}s, at $((SECONDS - started))s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        "$PYTHON" benchmarks/gpu_report.py error "$OUT/$name.json" --step "$name" --rc $rc --limit "$limit" \
            --log "$OUT/$name.log"
        echo "   failed (exit $rc); log $OUT/$name.log"
    fi
    grep -v -e '^WARNING' -e 'Warning' -e 'warnings.warn' "$OUT/$name.log" | tail -n 4 | sed 's/^/   /'
    # gpu.json after every step: a run cut short from outside still leaves every section so far.
    "$PYTHON" benchmarks/gpu_report.py summary "$OUT" --device "$DEVICE" >/dev/null
}

# Limits, in order: 35 + 60 + 90 + 100 + 40 + 140 = 465 s, plus the checks above and the summary.
step decoder 35 "$PYTHON" benchmarks/gpu_models.py "$DECODER" "${TINY[@]}" --device "$DEVICE" --out "$OUT/decoder.json"
step training-minilm 60 "$PYTHON" benchmarks/gpu_steps.py training --model "$MINILM" --label minilm \
    --device "$DEVICE" "${TINY[@]}" --out "$OUT/training-minilm.json"
step training-qwen2 90 "$PYTHON" benchmarks/gpu_steps.py training --model "$DECODER" --label qwen2-0.5b-random \
    --device "$DEVICE" "${TINY[@]}" --out "$OUT/training-qwen2.json"
step freshness 100 "$PYTHON" benchmarks/gpu_steps.py freshness --device "$DEVICE" "${TINY[@]}" \
    --budget-s $((90 * LIMIT_SCALE)) --out "$OUT/freshness.json"
step encoding 40 "$PYTHON" benchmarks/gpu_steps.py encoding --model "minilm=$MINILM" \
    --model "qwen2-0.5b-random=$DECODER" --device "$DEVICE" "${TINY[@]}" --out "$OUT/encoding.json"
if [ -n "$DATA" ]; then
    step evaluate 140 "$PYTHON" benchmarks/gpu_steps.py evaluate --data "$DATA" --work "$WORK/evaluate" \
        --device "$DEVICE" "${TINY[@]}" "${CPU_REFERENCE[@]}" --out "$OUT/evaluate.json"
else
    echo "no MovieLens folder (--data DIR)" >"$OUT/evaluate.log"
    "$PYTHON" benchmarks/gpu_report.py error "$OUT/evaluate.json" --step evaluate --rc 2 --limit 0 --log "$OUT/evaluate.log"
fi

echo "== all steps in $((SECONDS - started))s"
"$PYTHON" benchmarks/gpu_report.py summary "$OUT" --device "$DEVICE"
