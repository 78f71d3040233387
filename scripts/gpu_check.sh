#!/usr/bin/env bash
# The GPU checks, as ONE prepared run on a GPU machine (CI has none): ./scripts/gpu_check.sh [out-dir]
#
# Uses the machine's own python3 (it must hold torch with CUDA, pytest and transformers; nothing is installed),
# the moekit of this checkout (PYTHONPATH), and writes 7 files to the out dir ($OUT, else ./gpu-out):
#   env.txt                    GPU, driver, torch / CUDA / transformers versions
#   tests_cuda.log             every device-parametrized test on CUDA (-k cuda): each backend against the float64
#                              reference, forward and gradients, dropless and capacity modes, empty experts, T=1;
#                              the compiled backend; bf16 autocast; no host sync in the grouped layer
#   tests_train.log            the trainer end to end (it picks the GPU by itself): loss falls, bf16, eval, generate
#   bench_mixtral.log / .json  benchmarks/moe_layer.py --shape mixtral: d=4096, FFN 14336, E=8, top-2, T=16384, bf16
#   bench_fine.log / .json     --shape fine: d=2048, FFN 768, E=128, top-8, T=16384, bf16
# Each step has its own time limit and the script goes on after a failure; the last lines summarise.
# About 6-8 minutes on an H200 (most of it compiling: inductor/Triton for the compiled backend and its tests).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-$PWD/gpu-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
status=()

step() {  # step NAME SECONDS LOG COMMAND...
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$log"
    local rc=${PIPESTATUS[0]}
    status+=("$(printf '%-14s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$log")")
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
" 2>&1
} | tee "$out/env.txt"

step tests-cuda 300 tests_cuda.log "$py" -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_backends.py tests/test_perf_paths.py
step tests-train 150 tests_train.log "$py" -m pytest -q -p no:cacheprovider tests/test_train.py \
    -k "loss_falls or bf16_autocast or eval_and_generate"
step bench-mixtral 240 bench_mixtral.log "$py" benchmarks/moe_layer.py --device cuda --shape mixtral \
    --dtypes bf16 --out "$out/bench_mixtral.json"
step bench-fine 240 bench_fine.log "$py" benchmarks/moe_layer.py --device cuda --shape fine \
    --dtypes bf16 --out "$out/bench_fine.json"

echo
echo "gpu_check summary (out: $out)"
printf '  %s\n' "${status[@]}"
