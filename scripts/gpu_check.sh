#!/usr/bin/env bash
# The GPU checks, as ONE prepared run on a GPU machine (CI has none):
#   ./scripts/gpu_check.sh [out-dir] [steps]        e.g. ./scripts/gpu_check.sh "$OUT" tests,train,bench,compare
#
# Uses the machine's own python3 (it must hold torch with CUDA, pytest and transformers; nothing is installed),
# the moekit of this checkout (PYTHONPATH), and writes at most 8 files to the out dir ($OUT, else ./gpu-out):
#   env.txt                    GPU, driver, torch / CUDA / transformers versions
#   tests_cuda.log   (tests)   every device-parametrized test on CUDA (-k cuda): each backend against the float64
#                              reference, forward and gradients, dropless and capacity modes, empty experts, T=1;
#                              the compiled backend; bf16 autocast; no host sync in the grouped layer
#   tests_train.log  (train)   the trainer end to end (it picks the GPU by itself): loss falls, bf16, eval, generate
#   bench_mixtral.log / .json  (bench) benchmarks/moe_layer.py --shape mixtral: d=4096, FFN 14336, E=8, top-2,
#                              T=16384, bf16, against the equal-FLOP dense FFN and transformers' implementations
#   bench_fine.log / .json     (bench) --shape fine: d=2048, FFN 768, E=128, top-8, T=16384, bf16
#   compare.log      (compare) `moekit compare` (preset small, 200 steps) on the GPU, its report.md at the end
# Every step has its own time limit, all of them together at most BUDGET seconds (default 560: one 10-minute
# device call); a step that fails or runs out of time does not stop the others, and the last lines summarise.
# Expected on an H200: a few minutes, most of it compiling (inductor/Triton for the compiled backend and its tests).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-$PWD/gpu-out}}"
want=",${2:-tests,train,bench,compare},"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
deadline=$((SECONDS + ${BUDGET:-560}))
status=()

step() {  # step NAME SECONDS LOG COMMAND...: run COMMAND with the smaller of SECONDS and the time left
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((deadline - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        status+=("$(printf '%-14s skipped: the budget is spent' "$name")")
        return
    fi
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$log"
    local rc=${PIPESTATUS[0]}
    status+=("$(printf '%-14s rc=%-3s %4ss of %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$limit" "$log")")
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
" 2>&1
} | tee "$out/env.txt"

if [[ $want == *,tests,* ]]; then
    step tests-cuda 200 tests_cuda.log "$py" -m pytest -q -p no:cacheprovider -k cuda \
        tests/layer/test_backends.py tests/layer/test_perf_paths.py
fi
if [[ $want == *,train,* ]]; then
    step tests-train 100 tests_train.log "$py" -m pytest -q -p no:cacheprovider tests/train/test_train.py \
        -k "loss_falls or bf16_autocast or eval_and_generate"
fi
if [[ $want == *,bench,* ]]; then
    step bench-mixtral 150 bench_mixtral.log "$py" benchmarks/moe_layer.py --device cuda --shape mixtral \
        --dtypes bf16 --out "$out/bench_mixtral.json"
    step bench-fine 120 bench_fine.log "$py" benchmarks/moe_layer.py --device cuda --shape fine \
        --dtypes bf16 --out "$out/bench_fine.json"
fi
if [[ $want == *,compare,* ]]; then
    runs="$(mktemp -d)"
    step compare 120 compare.log bash -c "'$py' -m moekit compare --preset small --steps 200 --no-plots --quiet \
        --runs-dir '$runs' --name gpu && cat '$runs/gpu/report.md'"
fi

echo
echo "gpu_check summary (out: $out)"
printf '  %s\n' "${status[@]}"
