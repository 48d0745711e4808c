"""What launch hands the training function on every rank."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from moemesh.parallel.mesh import ParallelMesh


@dataclass
class RankContext:
    """Where this rank runs: handed to the training function (``worker(run, ctx)``) by
    ``launch.rank.run_rank``."""

    rank: int
    local_rank: int
    device: torch.device
    mesh: ParallelMesh
    output_dir: str
    # What train.py prepared for the training function (trainer.data.DataPaths). Launch only
    # carries it to the ranks (pickled into spawned ones): it sits below the trainer and
    # never looks inside.
    data_paths: Any
    stop_requested: Callable[[], bool] = lambda: False  # set by SIGTERM/SIGUSR1/SIGUSR2 (launch.signals)
    stop_signals: Callable[[], list] = lambda: []  # the names of the signals this rank received
    on_stop: Callable[[], None] = lambda: None  # called when the loop stops early for a signal
