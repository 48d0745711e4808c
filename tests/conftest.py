import os

# Triton kernels run on this CPU only through the interpreter, which must be chosen
# before triton is imported. A GPU run sets TRITON_INTERPRET=0 to compile them instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Shared helpers (tiny_run, SMALL) live in tests/helpers.py; this file holds fixtures only.


@pytest.fixture
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
