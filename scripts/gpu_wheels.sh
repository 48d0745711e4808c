#!/usr/bin/env bash
# Build, here (where the package index is), the wheels that the GPU machine's image lacks:
# einops (the model's reshapes), hydra-core and omegaconf (and antlr4, which is published only as a source archive, so
# it is built here into a pure-Python wheel). The image has torch, triton, numpy, PyYAML,
# pytest and hypothesis (see the device tool's KINDS.md). .gpu-wheels/ is git-ignored:
# name it in the device call's `carry`; scripts/gpu_check.sh installs it into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-wheels
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w .gpu-wheels \
  einops==0.8.2 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
ls .gpu-wheels
