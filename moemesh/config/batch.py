"""The batch arithmetic of a run, once: how the global batch is cut into micro-steps, then over
the data ranks (dp x ep), and the checks that make it exact. The trainer, the planner and the
layout sweeper all take a ``BatchPlan``; nothing else divides the global batch.

The global batch is cut into ``micro_steps`` micro-steps first, then each micro-step over the
data ranks: micro-step i holds the same samples on every layout with the same number of
micro-steps, so layouts that hold the count equal see the same data and the same balance
statistics (computed per micro-step).
"""

from __future__ import annotations

from dataclasses import dataclass

from moemesh.errors import ConfigError
from moemesh.parallel.dims import ParallelDims


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int  # sequences per optimizer step, over all data ranks
    seq_len: int
    micro_steps: int  # forward/backward passes per data rank per optimizer step
    micro_batch_size: int  # sequences per forward on one data rank
    data_size: int  # data ranks (dp x ep)

    @classmethod
    def of(cls, trainer, dims: ParallelDims) -> BatchPlan:
        """The plan of ``trainer`` (a TrainerConfig) on ``dims``; ConfigError, one line with the
        arithmetic, where the batch does not divide.

        ``trainer.micro_steps`` if set; else from ``trainer.micro_batch_size``; else 1, or pp
        with pipeline parallelism (the fewest that keep every stage of a 1F1B schedule busy).
        """
        t, n = trainer, dims.data_size
        ms, mb, g = t.micro_steps, t.micro_batch_size, t.global_batch_size
        if ms is not None and mb is not None and ms * mb * n != g:
            raise ConfigError(
                f"trainer.micro_steps={ms} and trainer.micro_batch_size={mb} disagree: "
                f"micro_steps*micro_batch_size*dp*ep = {ms}*{mb}*{dims.dp}*{dims.ep} != "
                f"trainer.global_batch_size={g}; set only one"
            )
        if mb is not None:
            unit = mb * n
            if g % unit:
                raise ConfigError(
                    f"trainer.global_batch_size={g} must be divisible by "
                    f"micro_batch_size*dp*ep = {mb}*{dims.dp}*{dims.ep} = {unit}"
                )
            return cls(g, t.seq_len, g // unit, mb, n)
        steps = ms if ms is not None else dims.pp
        unit = steps * n
        if g % unit:
            which = f"trainer.micro_steps={steps}" if ms is not None else f"{steps} micro-steps (pp={dims.pp})"
            raise ConfigError(
                f"trainer.global_batch_size={g} must be divisible by micro_steps*dp*ep = "
                f"{steps}*{dims.dp}*{dims.ep} = {unit} ({which}; or set trainer.micro_batch_size)"
            )
        return cls(g, t.seq_len, steps, g // unit, n)

    @property
    def tokens(self) -> int:
        """Tokens per optimizer step."""
        return self.global_batch_size * self.seq_len

    @property
    def micro_tokens(self) -> int:
        """Tokens per forward on one data rank."""
        return self.micro_batch_size * self.seq_len

    def micro_start(self, i: int, data_rank: int) -> int:
        """First global sample of micro-step ``i`` on data rank ``data_rank`` (of the step's batch)."""
        return i * self.micro_batch_size * self.data_size + data_rank * self.micro_batch_size
