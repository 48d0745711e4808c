#!/usr/bin/env bash
# The project's one prepared GPU check (kernels issue): on a CUDA machine, run the
# Triton kernel tests compiled (not interpreted: gating, permute, sort_chunks,
# unpermute and the experts' SwiGLU), the ops under torch.compile, the planner's bf16
# activation estimate against what autocast saves there, and the kernel and MoE-layer
# benchmarks (one GPU: no NCCL, no training run, no MFU). Installs nothing beyond the
# requirements; its sections' time limits add up to 6 minutes.
#
# The GPU machine (see the device tool's KINDS.md) has torch, triton, numpy, PyYAML,
# pytest and hypothesis but not hydra-core/omegaconf, and cannot reach a package index.
# Here, first: `bash scripts/gpu_wheels.sh` (builds .gpu-wheels/, git-ignored); then
# name .gpu-wheels in the device call's carry, and run there:
#
#   bash scripts/gpu_check.sh 2>&1 | tee "${OUT:-.}/gpu_check.log"
#
# If device time remains afterwards, tune the launch parameters (estimated 2-4 minutes,
# not yet measured), paste the printed table into moemesh/kernels/_tuning.py, and rerun
# bench_kernels:
#
#   timeout 240 python3 scripts/tune_kernels.py 2>&1 | tee "${OUT:-.}/tune.log"
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1  # a section cut by its timeout still shows what it printed
PY=${PYTHON:-python3}
status=0
section() { printf '\n== %s ==\n' "$1"; }

section "device"
date -u +%Y-%m-%dT%H:%MZ
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); assert torch.cuda.is_available()" || exit 1
if [ -d .gpu-wheels ]; then
  $PY -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu-wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || status=1
fi
has_hydra=1
$PY -c "import hydra, omegaconf, hypothesis" || {
  has_hydra=0; status=1
  echo "hydra-core/omegaconf/hypothesis missing: run scripts/gpu_wheels.sh here and carry .gpu-wheels;" \
       "the tests and bench_moe need them (bench_kernels runs without)"
}
timeout_flag=""
$PY -c "import pytest_timeout" 2>/dev/null && timeout_flag="--timeout 60"  # one hung test must not eat the rest

if [ $has_hydra = 1 ]; then
  section "kernel tests, compiled on CUDA (and the ops under torch.compile)"
  # test_swiglu.py first: a few small shapes and two kernels, seconds; if the section's limit
  # cuts the longer files, its results are already printed.
  timeout 140 $PY -m pytest -v --tb=short -p no:cacheprovider $timeout_flag \
    tests/kernels/test_swiglu.py tests/kernels/test_triton_kernels.py tests/kernels/test_compile.py || status=1
  # group-limited and scaled gating, compiled (its gpu-marked cases; DeepSeek-V3's router where
  # transformers is installed)
  timeout 40 $PY -m pytest -v --tb=short -p no:cacheprovider $timeout_flag -m gpu \
    tests/moe/test_routing_options.py || status=1
  # the planner's bf16 activation estimate against what autocast saves on this GPU (-s: its numbers)
  timeout 30 $PY -m pytest -v -s --tb=short -p no:cacheprovider $timeout_flag -m gpu \
    tests/planning/test_plan.py || status=1
fi

section "bench_kernels"
timeout 110 $PY scripts/bench_kernels.py || status=1

if [ $has_hydra = 1 ]; then
  section "bench_moe"
  timeout 40 $PY scripts/bench_moe.py || status=1
fi
exit $status
