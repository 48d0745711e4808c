#!/usr/bin/env bash
# The project's one prepared GPU check (kernels issue): on a CUDA machine, run the
# Triton kernel tests compiled (not interpreted), the ops under torch.compile, and
# the kernel and MoE-layer benchmarks. Installs nothing beyond the requirements; ends within 5 minutes.
#
#   bash scripts/gpu_check.sh 2>&1 | tee "${OUT:-.}/gpu_check.log"
#
# If device time remains afterwards, tune the launch parameters (about 2-3 minutes) and
# paste the printed table into kernels/_tuning.py, then rerun bench_kernels:
#
#   timeout 240 python3 scripts/tune_kernels.py 2>&1 | tee "${OUT:-.}/tune.log"
#
# Where the GPU machine has no package index, put wheels of the requirements in
# .gpu-wheels/ first (pip download -d .gpu-wheels hydra-core==1.3.8 omegaconf==2.3.1
# antlr4-python3-runtime==4.9.3 PyYAML hypothesis==6.155.2 sortedcontainers attrs).
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
  $PY -m pip install --quiet --no-index --find-links .gpu-wheels hydra-core omegaconf hypothesis || status=1
fi

section "kernel tests, compiled on CUDA (and the ops under torch.compile)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_triton_kernels.py tests/kernels/test_compile.py \
  || status=1

section "bench_kernels"
timeout 100 $PY scripts/bench_kernels.py || status=1

section "bench_moe"
timeout 45 $PY scripts/bench_moe.py || status=1
exit $status
