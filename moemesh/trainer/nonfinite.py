"""``trainer.on_nonfinite``: what a non-finite loss or gradient norm does to a step.

stop (default): the step raises a one-line FloatingPointError naming the step and the value,
before the update lands; the last good checkpoint is kept. skip: the update is skipped and
training goes on, until ``trainer.max_skipped_steps`` steps in a row were skipped (the weights
do not change while steps are skipped, so more would rarely recover).

The gradient norm is the same number on every rank (reduced gradients), so every rank decides
alike and none is left waiting in a collective.
"""

from __future__ import annotations

import math

import torch

from moemesh.fields import NonFinite


def update_allowed(grad_norm: torch.Tensor, step: int, on_nonfinite: str, *, on_device: bool | None = None) -> bool:
    """Whether this step updates the weights: False for a non-finite gradient norm with
    skip; with stop, the one-line FloatingPointError naming step and value (on CUDA a
    device-side assert naming the step, below).

    Stop mode on CUDA (``on_device``, None: whether the norm is on CUDA) asks nothing of the
    host: ``torch._assert_async`` puts the check on the stream before the clip and the
    optimizer's kernels, so a non-finite norm fails there and the update never lands. The
    error surfaces at the next sync (PhaseTimer's edge at the end of this phase) as a
    device-side assert, which leaves the CUDA context unusable (the stop saves nothing
    anyway) and whose message names the step but not the value: reading the value would be
    the sync this avoids. Elsewhere the check is a host sync, kept on purpose: on the CPU
    the assert would be one too, and skip needs the answer on the host to run
    ``optimizer.step()`` or not (masking the update on the device instead, e.g. a zero
    learning rate, would still step AdamW's moments and step count, so it is not a skip).
    """
    if on_device is None:
        on_device = grad_norm.is_cuda
    if on_device and on_nonfinite == NonFinite.stop:
        msg = (
            f"non-finite gradient norm at step {step} (its value is not read back: that would be a host sync): "
            "stopped before the update; trainer.on_nonfinite=skip skips such steps"
        )
        torch._assert_async(torch.isfinite(grad_norm), msg)  # no host sync: ordered on the device
        return True
    if bool(torch.isfinite(grad_norm)):  # host sync (every step; CPU, or skip mode): the decision above
        return True
    if on_nonfinite == NonFinite.stop:
        raise FloatingPointError(
            f"non-finite gradient norm {float(grad_norm)} at step {step}: stopped before the update; "
            f"the last good checkpoint is kept (trainer.on_nonfinite=skip skips such steps)"
        )
    return False


class NonFinitePolicy:
    """The policy of one run: ``update_allowed`` per step, ``skipped`` after a skipped one,
    ``check_loss`` once the step's loss is reduced, ``check_val_loss`` after an evaluation.
    Steps are numbered as the log numbers them (the first is step 1)."""

    def __init__(self, mode: str, max_skipped_steps: int):
        self.mode, self.max_skipped = mode, max_skipped_steps
        self.skipped_in_a_row = 0

    def update_allowed(self, grad_norm: torch.Tensor, step: int) -> bool:
        if update_allowed(grad_norm, step, self.mode):
            self.skipped_in_a_row = 0
            return True
        return False

    def skipped(self, step: int, say) -> None:
        """Count a skipped step and ``say`` so (one line); FloatingPointError after too many in a row."""
        self.skipped_in_a_row += 1
        n = self.skipped_in_a_row
        say(
            f"moemesh: step {step}: non-finite gradient norm, update skipped "
            f"({n} in a row; trainer.max_skipped_steps={self.max_skipped})"
        )
        if n >= self.max_skipped:
            # The weights have not changed since the first of these steps, so the next steps
            # would most likely be skipped too: a run that only skips is not training.
            raise FloatingPointError(
                f"{n} steps in a row skipped for a non-finite gradient norm (steps "
                f"{step + 1 - n}..{step}, trainer.max_skipped_steps={self.max_skipped}): "
                "stopped; the last good checkpoint is kept"
            )

    def check_loss(self, loss: float, step: int) -> None:
        if not math.isfinite(loss) and self.mode == NonFinite.stop:
            raise FloatingPointError(f"non-finite training loss {loss} at step {step}")

    def check_val_loss(self, loss: float, step: int) -> None:
        """After an evaluation (the same number on every rank): a non-finite validation loss
        means the last update made the weights non-finite, which the next step's training loss
        would find, unless this was the last step and a checkpoint of them came next."""
        if not math.isfinite(loss) and self.mode == NonFinite.stop:
            raise FloatingPointError(
                f"non-finite validation loss {loss} after step {step}: its update made the weights non-finite; "
                "stopped before saving them (the last good checkpoint is kept; a lower trainer.lr may help)"
            )
