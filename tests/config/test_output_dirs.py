"""The run directory's probe (config/cli.py:probe_dir), which every rank of a torchrun/srun
launch runs at the same moment on the same directory."""

import multiprocessing as mp
from pathlib import Path

from moemesh.config.cli import probe_dir


def _probe(path: str) -> str | None:
    return probe_dir(Path(path))


def test_ranks_probing_one_new_directory_at_once_all_find_it_usable(tmp_path):
    # Each rank saw the directory missing, then found it made (EEXIST) or removed again
    # (ENOENT) by another rank's probe: a torchrun run failed with "cannot be created and
    # written: [Errno 17 EEXIST]" on one of its two ranks before the probe allowed for that.
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        for trial in range(25):
            run = tmp_path / f"t{trial}" / "a" / "run"
            answers = pool.map(_probe, [str(run)] * 8)
            assert answers == [None] * 8, answers


def test_what_cannot_hold_a_run_is_still_refused(tmp_path):
    (tmp_path / "file").write_text("")
    assert probe_dir(tmp_path / "file" / "run").startswith("[Errno 20 ENOTDIR]")
    assert probe_dir(Path("/proc/moemesh-no-such-dir")).startswith("[Errno 2 ENOENT]")
    assert probe_dir(tmp_path / "new" / "run") is None
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
