"""Run one of scripts/ on this CPU with Triton's interpreter, as the GPU-path smoke tests do."""

import os
import subprocess
import sys

import pytest

from moemesh.kernels._triton import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton==3.9.0)")


def run_interpreted(repo_root, script, *args, timeout=300) -> subprocess.CompletedProcess:
    """``python scripts/<script> <args>`` with TRITON_INTERPRET=1; asserts it exits 0."""
    out = subprocess.run(
        [sys.executable, f"scripts/{script}", *map(str, args)],
        cwd=repo_root,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out
