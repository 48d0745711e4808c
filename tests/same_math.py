"""What the equivalence tests share (DESIGN's invariant 1, "same math on every layout").

A layout is compared with a reference trained in the same test, on the same machine:

* ``assert_same_run``: per step, loss, aux loss, z loss and gradient norm to ``REL`` for as
  long as routing is identical. Top-k routing is discontinuous: fp32 sums in another order
  (another CPU, another BLAS thread count, a matmul split over TP ranks) can move one token
  over a top-k boundary, after which two correct runs drift apart. Such a flip shows in the
  routed tokens per expert (``load.layer<l>.tokens_per_expert``, per step): the comparison
  stops at the first step where they differ, and fails unless at least ``min_steps`` steps
  were compared, and unless the first difference is a few pairs (a flip), not a different
  routing (a bug).
* ``train_keeping_grads`` / ``assert_grads_match``: every parameter's gradient as the
  optimizer receives it at step 1, each rank's piece (its TP shard, its experts, its
  pipeline stage's layers, gathered from the FSDP shards) against the same slice of the
  reference's, and every element of the reference covered by some rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moemesh.parallel.dims import MeshAxis
from moemesh.parallel.tags import TP_SHARD, expert_first_id

REL = 1e-5  # loss, aux, z, grad norm: relative, per step
GRAD_TOL = 1e-5  # each gradient: max |got - want| over the largest |want| of that parameter
RECORD_KEYS = ("loss", "aux_loss", "z_loss", "grad_norm")
# The session's thread count before any test changed it: OMP_NUM_THREADS, else torch's default
# (the cores). References train with it, so OMP_NUM_THREADS=1 changes their summation order.
THREADS = torch.get_num_threads()


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _routing_diff(a: dict, b: dict) -> dict[str, int]:
    """Per MoE layer, the (token, k) pairs that went to another expert (0 where routing agrees)."""
    assert a["load"].keys() == b["load"].keys(), (sorted(a["load"]), sorted(b["load"]))
    out = {}
    for layer, st in a["load"].items():
        x, y = st["tokens_per_expert"], b["load"][layer]["tokens_per_expert"]
        assert len(x) == len(y) and sum(x) == sum(y), (layer, x, y)  # dropless: every pair is routed
        out[layer] = sum(abs(i - j) for i, j in zip(x, y)) // 2
    return out


def same_routing_steps(ref: list[dict], got: list[dict], label: str) -> int:
    """How many leading steps route every pair as ``ref`` does (equal tokens per expert in every
    layer)."""
    assert [r["step"] for r in got] == [r["step"] for r in ref], label
    for n, (a, b) in enumerate(zip(ref, got)):
        if any(_routing_diff(a, b).values()):
            return n
    return len(ref)


def _assert_a_flip(a: dict, b: dict, label: str) -> None:
    """Where routing first differs it must be a rounding flip: at most ``max(2, 1%)`` of a
    layer's routed pairs went elsewhere, not a model that routes differently."""
    for layer, pairs in _routing_diff(a, b).items():
        routed = sum(a["load"][layer]["tokens_per_expert"])
        assert pairs <= max(2, routed // 100), (
            f"{label}: at step {a['step']} {layer} routes {pairs} of {routed} pairs elsewhere: "
            "not a rounding flip but a different routing"
        )


def assert_same_run(ref: list[dict], got: list[dict], label: str, *, min_steps: int, keys=RECORD_KEYS) -> int:
    """``got`` equals ``ref`` per step in ``keys`` to ``REL`` over the steps routed identically,
    which must be at least ``min_steps``; returns how many steps were compared."""
    n = same_routing_steps(ref, got, label)
    if n < len(ref):
        _assert_a_flip(ref[n], got[n], label)
    if n < min_steps:
        a, b = ref[n], got[n]
        moved = {layer: pairs for layer, pairs in _routing_diff(a, b).items() if pairs}
        raise AssertionError(
            f"{label}: routing first differs at step {a['step']} (pairs moved: {moved}; loss {b['loss']} vs "
            f"{a['loss']}): {n} steps compared, fewer than the {min_steps} this test needs. A bug, or a "
            "rounding flip this early (then give the test a model or seed with more routing margin)"
        )
    for a, b in zip(ref[:n], got[:n]):
        for key in keys:
            want, have = a[key], b[key]
            assert abs(have - want) <= REL * abs(want), (label, a["step"], key, want, have)
    return n


def worst_rel(ref: list[dict], got: list[dict], n: int, keys=RECORD_KEYS) -> float:
    """The largest relative difference over the first ``n`` steps (for the measured margins)."""
    return max((abs(b[k] - a[k]) / abs(a[k]) for a, b in zip(ref[:n], got[:n]) for k in keys if a[k]), default=0.0)


def grad_pieces(model, mesh) -> dict[str, dict]:
    """This rank's gradients, each with where it sits in the whole model's tensor: its experts
    (global ids), its TP shard. Sharded modes: gathered over the FSDP unit's group (a
    collective: every rank of a stage calls it for the same parameters in the same order)."""
    tp_rank, tp = mesh.coords[MeshAxis.TP], mesh.dims.tp
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        assert g is not None, f"{name}: no gradient after the backward"
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = {
            "grad": g.detach().clone(),
            "expert_first": expert_first_id(p),
            "tp": getattr(p, TP_SHARD, None) if tp > 1 else None,
            "tp_rank": tp_rank,
        }
    return out


def train_keeping_grads(run, ctx, grads_path) -> dict:
    """Train ``run`` on this rank (as ``train``), saving to ``grads_path`` the gradients the
    optimizer receives at step 1 (reduced and clipped, before the update); returns the summary."""
    from moemesh.trainer.loop import build_training, run_training

    state = build_training(run, ctx)
    saved: list[bool] = []

    def keep(optimizer, args, kwargs):
        if not saved:
            torch.save(grad_pieces(state.model, ctx.mesh), grads_path)
            saved.append(True)

    handle = state.optimizer.register_step_pre_hook(keep)
    try:
        return run_training(state)
    finally:
        handle.remove()


def train_reference(run, out_dir, data_paths) -> dict:
    """``run`` in this process, as a one-rank mesh, with the session's thread count; its step-1
    gradients in ``out_dir/grads.pt``; returns the summary."""
    from moemesh.parallel.mesh import single_rank_mesh
    from tests.helpers import cpu_context

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    ctx = cpu_context(0, single_rank_mesh(), out_dir, data_paths)
    return train_keeping_grads(run, ctx, Path(out_dir) / "grads.pt")


def load_grads(path) -> dict[str, dict]:
    return torch.load(path, weights_only=True)


def _where(piece: dict, whole: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor]:
    """The index of ``piece`` in the whole tensor, and its gradient without TP padding."""
    g = piece["grad"]
    idx = [slice(None)] * whole.ndim
    first = piece["expert_first"]
    if first is not None:
        idx[0] = slice(first, first + g.shape[0])
    if piece["tp"] is not None:
        dim, logical = piece["tp"]
        n = g.shape[dim]
        start = piece["tp_rank"] * n
        stop = min(start + n, logical)
        pad = g.narrow(dim, stop - start, n - (stop - start))
        assert not pad.any(), "the padded vocabulary rows have a gradient"
        g = g.narrow(dim, 0, stop - start)
        idx[dim] = slice(start, stop)
    return tuple(idx), g


def assert_grads_match(ref: dict[str, dict], ranks: list[dict[str, dict]], label: str, tol: float = GRAD_TOL) -> float:
    """Every rank's gradient piece equals the reference's slice to ``tol`` (relative to the
    parameter's largest reference entry); every reference element is some rank's. Returns the
    worst relative error seen."""
    whole = {name: piece["grad"] for name, piece in ref.items()}
    covered = {name: torch.zeros(g.shape, dtype=torch.bool) for name, g in whole.items()}
    worst = 0.0
    for rank, pieces in enumerate(ranks):
        for name, piece in pieces.items():
            assert name in whole, (label, rank, name)
            idx, got = _where(piece, whole[name])
            want = whole[name][idx]
            assert got.shape == want.shape, (label, rank, name, tuple(got.shape), tuple(want.shape))
            scale = float(whole[name].abs().max())
            err = float((got - want).abs().max()) if got.numel() else 0.0
            rel = err / scale if scale else (0.0 if err == 0 else float("inf"))
            assert rel <= tol, f"{label}: rank {rank} {name}: gradient off by {rel:.2e} of its largest entry"
            worst = max(worst, rel)
            covered[name][idx] = True
    missing = [name for name, c in covered.items() if not bool(c.all())]
    assert not missing, f"{label}: no rank holds (all of) the gradient of {missing}"
    return worst


def assert_trains_like(ref_dir, out_dir, world: int, label: str, *, min_steps: int) -> tuple[int, float, float]:
    """The run in ``out_dir`` (``world`` ranks, ``train_keeping_grads``) against the reference in
    ``ref_dir`` (``train_reference``): step-1 gradients first (routing at step 1 identical), then
    the per-step records. Returns (steps compared, worst gradient error, worst record error)."""
    ref, got = read_metrics(ref_dir), read_metrics(out_dir)
    n = same_routing_steps(ref, got, label)
    worst_grad = float("nan")
    if n >= 1:
        ranks = [load_grads(Path(out_dir) / f"grads{r}.pt") for r in range(world)]
        worst_grad = assert_grads_match(load_grads(Path(ref_dir) / "grads.pt"), ranks, label)
    assert_same_run(ref, got, label, min_steps=min_steps)
    return n, worst_grad, worst_rel(ref, got, n)
