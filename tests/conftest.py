import os

# Triton kernels run on this CPU only through the interpreter, which must be chosen
# before triton is imported. A GPU run sets TRITON_INTERPRET=0 to compile them instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Shared helpers (tiny_run, SMALL) live in tests/helpers.py; this file holds fixtures only.


@pytest.fixture
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_umask():
    """train.py sets the process umask (cluster.output_access); a test that runs it in-process
    must not leave that to the tests after it (nor to the daemons a test starts)."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)
