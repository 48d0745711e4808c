"""Stop signals become a stop request the training loop acts on at a step boundary.

Nothing here imports torch: the SLURM launcher plugin installs these handlers in its
tasks before anything else.
"""

from __future__ import annotations

import signal


class StopFlag:
    """Set by a signal; the training loop polls it once per step (and tells the other ranks)."""

    def __init__(self):
        self.received: list[int] = []  # in arrival order
        self.stopped_early = False  # the training loop stopped before its last step because of it

    def set(self, signum, frame):
        if signum not in self.received:
            self.received.append(signum)

    def get(self) -> bool:
        return bool(self.received)

    def names(self) -> list[str]:
        return [signal.Signals(s).name for s in self.received]

    def mark_stopped(self) -> None:
        self.stopped_early = True


# SIGTERM: preemption or scancel; SIGUSR1/SIGUSR2: SLURM's warning before the time limit
# (--signal; submitit asks for SIGUSR2); SIGINT: Ctrl-C. Each means: finish this step, save, stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
_STOP = StopFlag()


def _interrupt_twice(signum, frame):
    """A lone process: the first Ctrl-C asks for a save; the second one stops it now."""
    if signal.SIGINT in _STOP.received:
        raise KeyboardInterrupt
    _STOP.set(signum, frame)


def install_stop_handlers(*, second_interrupt_exits: bool = False) -> StopFlag:
    """Turn the stop signals into a request the training loop acts on at a step boundary.

    One flag per process, so a signal that arrives while the process is still starting
    (before the loop) is not lost. A Ctrl-C reaches every process of the terminal's group:
    ranks under a parent (spawned, torchrun, srun) take any number of SIGINTs as one request
    and leave the second Ctrl-C to the parent, which stops them at once; a process without
    a parent launcher (``second_interrupt_exits``) stops itself on the second.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, _STOP.set)
    if second_interrupt_exits:
        signal.signal(signal.SIGINT, _interrupt_twice)
    return _STOP
