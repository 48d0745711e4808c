"""Watching train.py's processes from a test: shared by the fault and hang tests."""

import os
import time
from pathlib import Path


def wait_for_steps(tmp_path, n, proc, timeout=120, *, metrics=None):
    """Wait until train.py's run under ``tmp_path`` (or the run writing ``metrics``) has logged ``n``
    steps, ``proc`` still alive."""
    metrics = metrics or tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"training did not log {n} steps in {timeout} s")


def ranks_of(pid):
    """The rank processes a launcher ``pid`` started: its children, less multiprocessing's resource
    tracker; where a child is the fork server bare ``train.py`` starts, the ranks are its children."""
    ranks = []
    for kid, cmd in children(pid):
        if b"resource_tracker" in cmd:
            continue
        if b"multiprocessing.forkserver" in cmd:
            ranks += [k for k, _ in children(kid)]
        else:
            ranks.append(kid)
    return sorted(ranks)


def descendants(pid):
    """Every process below ``pid``: its children, theirs, and so on."""
    return [p for kid, _ in children(pid) for p in (kid, *descendants(kid))]


def children(pid):
    """``(pid, cmdline)`` of each child of ``pid``."""
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(pid):
                kids.append((int(p), cmd))
    return kids
