"""Who may read what a run writes: cluster.output_access as the process umask.

Set before Hydra creates the run directory and before any process that writes for the run
starts (train.py's fork server included: its ranks take the launcher's umask at each launch).
Nothing here imports torch.
"""

from __future__ import annotations

import functools
import operator
import os

from moemesh.config.schema import RunConfig
from moemesh.errors import ConfigError

# What each cluster.output_access lets others do with the run's files: the process umask.
OUTPUT_UMASKS = {"private": 0o077, "group": 0o027, "inherit": None}


def output_umask(run: RunConfig) -> int | None:
    access = run.cluster.output_access
    if access not in OUTPUT_UMASKS:
        raise ConfigError(
            f"cluster.output_access={access}: valid: {', '.join(OUTPUT_UMASKS)} (private: 0700/0600; "
            "group: group may read, 0750/0640; inherit: the shell's umask)"
        )
    return OUTPUT_UMASKS[access]


def set_output_umask(runs) -> None:
    """Set the process umask before Hydra creates the run directory: checkpoints, metrics
    and logs may hold data or paths others must not read. Several runs (a sweep): the most
    private of them. Spawned ranks take it from the launcher at each launch; torchrun's and
    srun's ranks run this themselves."""
    masks = [output_umask(run) for run in runs]
    if all(m is None for m in masks):
        return
    current = os.umask(0)
    os.umask(functools.reduce(operator.or_, (current if m is None else m for m in masks)))
