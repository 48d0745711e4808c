"""The trainer's side of checkpoints: what to save (model, optimizer, step), the checks
before the first step, and how a run resumes, falling back to older checkpoints. The
mechanics (global keys, atomic saves, data-only loading, checksums) live in
parallel.checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moemesh.config.schema import RunConfig
from moemesh.errors import ConfigError
from moemesh.fields import Sharding
from moemesh.moe.config import ORIGIN_FIELDS, ModelConfig
from moemesh.moe.param_count import param_specs
from moemesh.parallel import checkpoint
from moemesh.parallel.mesh import ParallelMesh

if TYPE_CHECKING:
    from moemesh.data import DataSpec

# A checkpoint saved before a model field existed holds the field's default.
_DEFAULTS = dataclasses.asdict(ModelConfig())


class Checkpointer:
    """Saving and resuming this run's training state (see parallel.checkpoint)."""

    def __init__(self, run: RunConfig, model, optimizer, mesh: ParallelMesh, root: Path, data=None):
        """``data``: the run's ``moemesh.data.TokenData``, whose position each checkpoint records
        (meta.json's "data") and a resume restores, checked against the data it now reads."""
        self.run, self.model, self.optimizer, self.mesh, self.root = run, model, optimizer, mesh, root
        self.data = data
        self.step_t = torch.zeros((), dtype=torch.int64)
        self.run_id = uuid.uuid4().hex  # this start's saves (pruning keeps them over any other run's)
        d = mesh.dims
        self.tp_mesh = mesh.device_mesh["tp"] if d.tp > 1 else None
        self.fsdp_tp_mesh = None
        if d.tp > 1 and run.parallel.sharding != Sharding.none:
            with warnings.catch_warnings():  # torch warns that slicing a flattened dim will change
                warnings.simplefilter("ignore", UserWarning)
                self.fsdp_tp_mesh = mesh.device_mesh["data", "tp"]
        self.meta: dict[str, Any] = {
            "model": dataclasses.asdict(run.model),
            "layout": run.parallel.name,
            "dp": d.dp,
            "ep": d.ep,
            "tp": d.tp,
            "pp": d.pp,
        }
        if run.model.hf_path is not None:  # where the weights came from, for scripts/export_hf.py
            from moemesh.interop.hf.families import origin_meta

            self.meta["hf"] = origin_meta(run.model)

    def expected(self) -> tuple[int, int]:
        """(entries, bytes) of the whole model's checkpoint (every stage's): each parameter (each
        routed expert on its own) and its two AdamW moments in fp32, a bias per MoE layer, the
        step and the RNG state (counted at 64 KiB)."""
        m = self.run.model
        specs = param_specs(m)
        entries = sum(m.num_experts if s.expert else 1 for s in specs)
        numel = sum(s.numel for s in specs)
        return 3 * entries + m.num_layers + 2, 12 * numel + 4 * m.num_layers * m.num_experts + (64 << 10)

    def _state(self):
        return checkpoint.training_state(self.model, self.optimizer, self.step_t, self.tp_mesh, self.fsdp_tp_mesh)

    def preflight(self, run_dir=None) -> int:
        """Before the first step: the checkpoint directory (and the run directory) can be
        written and has room for one checkpoint; half-written ones are removed. A
        CheckpointError naming the path otherwise. Returns one checkpoint's estimated bytes
        (``space_warning`` takes them once the run knows where it starts)."""
        # AdamW creates its moments at the first step: count them as the parameters' twins.
        moments = types.SimpleNamespace(
            state={
                p: {"exp_avg": p.data, "exp_avg_sq": p.data} for g in self.optimizer.param_groups for p in g["params"]
            }
        )
        state = checkpoint.training_state(self.model, moments, self.step_t, self.tp_mesh, self.fsdp_tp_mesh)
        c = self.run.checkpoint
        fresh = self.run.resume is None and (c.every > 0 or c.save_final)  # a run that saves, from step 1
        return checkpoint.preflight(
            self.root, state, rank=self.mesh.rank, run_dir=Path(run_dir) if run_dir else None, fresh=fresh
        )

    def space_warning(self, need: int, start: int) -> str | None:
        """On rank 0, a warning (or None) when the disk holds one checkpoint of ``need`` bytes but
        not the ``checkpoint.keep`` + 1 that the saves after step ``start`` need at once
        (``checkpoint.space_warning``)."""
        if self.mesh.rank != 0:
            return None
        c, steps = self.run.checkpoint, self.run.trainer.steps
        periodic = (steps // c.every - start // c.every) if c.every else 0
        saves = periodic + int(c.save_final and start < steps and not (c.every and steps % c.every == 0))
        return checkpoint.space_warning(self.root, need, keep=c.keep, saves=saves)

    def save(self, step: int) -> Path:
        self.step_t.fill_(step)
        # AdamW's own count: behind the trainer's step by the steps skipped for a non-finite gradient
        # norm (trainer.on_nonfinite=skip); its bias correction continues from it on resume.
        meta = {**self.meta, "optimizer_step": checkpoint.optimizer_step(self.optimizer)}
        if self.data is not None:
            t = self.run.trainer
            meta = {**meta, "data": self.data.position(step, global_batch=t.global_batch_size, seq_len=t.seq_len)}
        return checkpoint.save(
            self.root, step, self._state(), meta, rank=self.mesh.rank, keep=self.run.checkpoint.keep, run_id=self.run_id
        )

    def resume(self, log) -> int:
        """Load the newest loadable checkpoint; fall back to older ones with a warning."""
        assert self.run.resume is not None  # the loop calls resume() only when run.resume is set
        candidates = checkpoint.resolve(self.run.resume, self.root)
        if not candidates:
            if self.run.resume != "auto":
                raise checkpoint.CheckpointError(f"resume={self.run.resume}: no complete checkpoint")
            log.message(f"moemesh: resume=auto: no checkpoint in {self.root}, starting fresh")
            return 0
        checkpoint.init_optimizer_state(self.optimizer)
        reasons = []
        for i, path in enumerate(candidates):
            state = self._state()
            try:
                meta = checkpoint.load(path, state, check=self._check_meta, expected=self.expected())
                if int(self.step_t) != meta["step"]:  # what was loaded fills the model; the next load replaces it all
                    raise checkpoint.CheckpointError(
                        f"{path}: refused: its step tensor holds {int(self.step_t)}, its meta.json {meta['step']}"
                    )
            except checkpoint.CheckpointError as err:  # refused, corrupt or mismatched: try the previous one
                reasons.append(str(err))
                then = f"; trying {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
                log.message(f"moemesh: warning: cannot resume from {path.name}: {err}{then}")
                continue
            step = int(self.step_t)
            checkpoint.set_optimizer_step(self.optimizer, meta.get("optimizer_step", step))  # older: none skipped
            torch.set_rng_state(state["rng.cpu"])
            log.message(f"moemesh: resumed from {path} (saved under {meta['layout']}) at step {step}")
            if self.data is not None:
                note = self.data.resume_at(step, meta.get("data"), seq_len=self.run.trainer.seq_len)
                log.message(f"moemesh: {note}")
            return step
        raise checkpoint.CheckpointError(
            f"resume={self.run.resume}: none of {len(candidates)} checkpoint(s) could be loaded: " + "; ".join(reasons)
        )

    def _check_meta(self, path: Path, meta: dict) -> None:
        """Before a byte of tensors is read: the fields the trainer reads are there and typed
        (a missing one is a refusal, so resume falls back), the step is one this run can train
        from, and the model is this one."""
        problem = meta_problem(self.run, path, meta)
        if problem is None and self.data is not None:
            problem = data_problem(self.run, path, meta, self.data.spec)
        if problem:
            raise checkpoint.CheckpointError(problem)


def meta_problem(run: RunConfig, path: Path, meta: dict) -> str | None:
    """Why ``run`` cannot resume from the checkpoint at ``path`` by what its meta.json says
    (``read_meta`` checked the rest), or None: the fields the trainer reads are there and typed,
    the step is one this run can train from, and the model is this one. The ranks ask before
    a byte of tensors is read; train.py asks before any rank starts (``check_resume``)."""
    typed = {
        "layout": isinstance(meta.get("layout"), str),
        "model": isinstance(meta.get("model"), dict),
        **{k: type(meta.get(k)) is int and meta[k] >= 1 for k in ("dp", "ep", "tp", "pp")},
    }
    bad = next((k for k, ok in typed.items() if not ok), None)
    if bad is not None:
        what = {"layout": "a string", "model": "an object"}.get(bad, "an integer >= 1")
        return f"{path / 'meta.json'}: refused: '{bad}' is missing or not {what}"
    steps = run.trainer.steps
    if meta["step"] > steps:  # read_meta checked it is an int >= 1
        return (
            f"{path} was saved after step {meta['step']}, past trainer.steps={steps}: nothing would be trained "
            "(raise trainer.steps to continue it)"
        )
    opt_step = meta.get("optimizer_step", meta["step"])
    if type(opt_step) is not int or not 0 <= opt_step <= meta["step"]:
        return f"{path / 'meta.json'}: refused: 'optimizer_step' is not an integer in [0, step {meta['step']}]"
    saved, mine = meta["model"], dataclasses.asdict(run.model)
    diff = [
        f"model.{k}={_cut(saved.get(k))} (now {v!r})"
        for k, v in mine.items()
        if k not in ORIGIN_FIELDS and saved.get(k, _DEFAULTS.get(k)) != v
    ]
    if diff:
        return f"{path} was saved for another model: {', '.join(diff)}"
    return None


def data_problem(run: RunConfig, path: Path, meta: dict, spec: DataSpec) -> str | None:
    """Why ``run``, reading ``spec``, cannot continue the data position the checkpoint at ``path``
    records (a malformed one; another corpus, mixture, split, seed or seq_len, unless
    data.resume_on_new_data), or None. None too for a checkpoint from before positions were kept."""
    position = meta.get("data")
    if position is None:
        return None
    problem = _position_problem(position)
    if problem:
        return f"{path / 'meta.json'}: refused: 'data' {problem}"
    if run.data.resume_on_new_data:
        return None
    why = spec.position_problem(position, seed=run.trainer.seed, seq_len=run.trainer.seq_len)
    return f"{path}: {why}" if why else None


def check_resume(run: RunConfig, spec: DataSpec | None = None) -> None:
    """Before any rank starts, for ``resume=<path>``: at least one of the checkpoints there has a
    meta.json this run could resume from (``meta_problem``) and, given the prepared data's
    ``spec`` (train.py, once the data is prepared), a data position it can continue
    (``data_problem``); ConfigError, one line, otherwise. What needs the tensors (checksums,
    shapes) the ranks check."""
    if run.resume in (None, "auto"):
        return  # auto: whatever the run's own directory holds, a fresh start if nothing
    candidates = checkpoint.resolve(run.resume, Path(run.resume))
    reasons = []
    for path in candidates:
        try:
            meta = checkpoint.read_meta(path)
            problem = meta_problem(run, path, meta)
            if problem is None and spec is not None:
                problem = data_problem(run, path, meta, spec)
        except checkpoint.CheckpointError as err:
            problem = str(err)
        if problem is None:
            return
        reasons.append(problem)
    if reasons:
        raise ConfigError(
            f"resume={run.resume}: none of {len(candidates)} checkpoint(s) could be loaded: " + "; ".join(reasons)
        )


def _cut(value) -> str:
    """A value from a checkpoint's meta.json, short enough for one line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MAX_COUNT = 1 << 62  # past any real count of samples or windows; 10^30 overflowed the reader's int64


def _position_problem(position) -> str | None:
    """Why meta.json's data position (TokenData.position) is not what a resume reads, or None."""
    if not isinstance(position, dict):
        return "is not an object"
    for key in ("samples", "step", "seq_len"):
        if type(position.get(key)) is not int or not 0 <= position[key] < _MAX_COUNT:
            return f"has no '{key}' integer in [0, 2^62)"
    sources = position.get("sources")
    if not isinstance(sources, list):
        return "has no list of 'sources'"
    for s in sources:
        ints = ("windows", "samples", "epoch", "window_in_epoch")
        if (
            not isinstance(s, dict)
            or not isinstance(s.get("name"), str)
            or any(type(s.get(k)) is not int or not 0 <= s[k] < _MAX_COUNT for k in ints)
        ):
            return "has a source that is not {name, windows, samples, epoch, window_in_epoch}"
    return None
