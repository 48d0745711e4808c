"""The trainer's side of checkpoints: what to save (model, optimizer, step) and how a
run resumes, falling back to older checkpoints. The mechanics (global keys,
atomic saves, safe loading) live in parallel.checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from conf.schema import RunConfig
from parallel import checkpoint
from parallel.mesh import ParallelMesh


class Checkpointer:
    """Saving and resuming this run's training state (see parallel.checkpoint)."""

    def __init__(self, run: RunConfig, model, optimizer, mesh: ParallelMesh, root: Path):
        self.run, self.model, self.optimizer, self.mesh, self.root = run, model, optimizer, mesh, root
        self.step_t = torch.zeros((), dtype=torch.int64)
        d = mesh.dims
        self.tp_mesh = mesh.device_mesh["tp"] if d.tp > 1 else None
        self.meta = {"model": dataclasses.asdict(run.model), "layout": run.parallel.name,
                     "dp": d.dp, "ep": d.ep, "tp": d.tp, "pp": d.pp}

    def _state(self):
        return checkpoint.training_state(self.model, self.optimizer, self.step_t, self.tp_mesh)

    def save(self, step: int) -> Path:
        self.step_t.fill_(step)
        return checkpoint.save(self.root, step, self._state(), self.meta, rank=self.mesh.rank,
                               keep=self.run.checkpoint.keep)

    def resume(self, log) -> int:
        """Load the newest loadable checkpoint; fall back to older ones with a warning."""
        candidates = checkpoint.resolve(self.run.resume, self.root)
        if not candidates:
            if self.run.resume != "auto":
                raise checkpoint.CheckpointError(f"resume={self.run.resume}: no complete checkpoint")
            log.message(f"moemesh: resume=auto: no checkpoint in {self.root}, starting fresh")
            return 0
        checkpoint.init_optimizer_state(self.optimizer)
        reasons = []
        for path in candidates:
            try:
                self._check_meta(path)
                state = self._state()
                checkpoint.load(path, state)
            except (Exception, CheckpointException) as err:  # truncated or mismatched: try the previous one
                reason = f"{path.name}: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                reasons.append(reason)
                log.message(f"moemesh: warning: cannot resume from {reason}")
                continue
            step = int(self.step_t)
            checkpoint.set_optimizer_step(self.optimizer, step)
            torch.set_rng_state(state["rng.cpu"])
            log.message(f"moemesh: resumed from {path} (saved under {json.loads((path / 'meta.json').read_text())['layout']}) "
                        f"at step {step}")
            return step
        raise checkpoint.CheckpointError(
            f"resume={self.run.resume}: none of {len(candidates)} checkpoint(s) could be loaded: "
            + "; ".join(reasons))

    def _check_meta(self, path: Path) -> None:
        meta = json.loads((path / "meta.json").read_text())
        saved, mine = meta["model"], self.meta["model"]
        diff = [f"model.{k}={saved.get(k)!r} (now {v!r})" for k, v in mine.items()
                if k != "name" and saved.get(k) != v]
        if diff:
            raise checkpoint.CheckpointError(f"{path} was saved for another model: {', '.join(diff)}")
