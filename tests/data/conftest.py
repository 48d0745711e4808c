import pytest

from tests.data._corpus import train_bpe


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE with 70,000 ids (trained here, ~2 s): its shards are uint32."""
    return train_bpe(tmp_path_factory.mktemp("tok") / "bpe70k")
