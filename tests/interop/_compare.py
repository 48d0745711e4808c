"""The moemesh side against transformers' own model: logits, loss and every gradient, mapped
tensor by tensor through moemesh/interop/hf/names.py (transformers 5 holds its experts fused in
memory: the "fused" layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moemesh.interop.hf.names import Generated, Layout, Ref, hf_ref
from moemesh.moe.config import is_moe_layer

IN_MEMORY = Layout("mlp", "fused")  # transformers 5's modules, for every family
RTOL = 1e-5  # fp32, relative to each tensor's largest value


def hf_aux_per_layer(hf_model, router_logits, top_k: int):
    """transformers' own balance loss, one MoE layer at a time (transformers pools the layers into
    one loss; moemesh adds one per layer: docs/hf.md)."""
    import importlib

    module = importlib.import_module(type(hf_model).__module__)
    E = router_logits[0].shape[-1]
    return [module.load_balancing_loss_func((logits,), E, top_k) for logits in router_logits]


def hf_step(hf_model, x, y, *, aux_per_layer: float = 0.0, micro_steps: int = 1):
    """transformers' logits (of the whole batch) and the gradients of moemesh's objective computed
    with transformers' model: per micro-step, mean cross-entropy + aux_per_layer x each MoE layer's
    balance loss (transformers' function), averaged over the micro-steps."""
    hf_model.zero_grad(set_to_none=True)
    top_k = hf_model.config.num_experts_per_tok
    losses = []
    for xm, ym in zip(x.chunk(micro_steps), y.chunk(micro_steps)):
        out = hf_model(xm, output_router_logits=aux_per_layer > 0)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), ym.flatten())
        loss = ce
        if aux_per_layer:
            loss = loss + aux_per_layer * sum(hf_aux_per_layer(hf_model, out.router_logits, top_k))
        (loss / micro_steps).backward()
        losses.append(ce.detach())
    with torch.no_grad():
        logits = hf_model(x).logits
    grads = {n: p.grad for n, p in hf_model.named_parameters() if p.grad is not None}
    return logits, torch.stack(losses).mean(), grads


def select(t: torch.Tensor, ref: Ref) -> torch.Tensor:
    """What ``ref`` names in the tensor ``t`` (as moemesh holds it)."""
    if ref.expert is not None:
        t = t[ref.expert]
    if ref.rows is not None:
        t = t[ref.rows[0] : ref.rows[1]]
    if ref.cols is not None:
        t = t[:, ref.cols[0] : ref.cols[1]]
    t = t.t() if ref.transpose else t
    return t * ref.scale if ref.scale != 1.0 else t


def box(t: torch.Tensor, offset, shape) -> torch.Tensor:
    return t[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def moemesh_model_name(cfg, key: str) -> bool:
    """Whether moemesh's ``key`` has a counterpart in the transformers model (upcycled routers do not)."""
    return not isinstance(hf_ref(cfg, key, IN_MEMORY), Generated)


def assert_matches(cfg, entries: dict, hf_tensors: dict, what: str, *, rtol: float = RTOL) -> int:
    """Every moemesh entry (global key -> this rank's tensor, plain or DTensor) equals its box of
    the transformers tensor; the vocabulary's padding rows are zero. Returns the entries compared."""
    from moemesh.interop.hf.load import local_box

    n = 0
    for key, t in entries.items():
        ref = hf_ref(cfg, key, IN_MEMORY)
        if isinstance(ref, Generated):
            continue
        local, offset, _ = local_box(t)
        full = select(hf_tensors[ref.name], ref)
        rows = max(0, min(local.shape[0], full.shape[0] - offset[0])) if local.dim() else 0
        want = box(full, offset, (rows, *local.shape[1:]))
        scale = max(float(full.abs().max()), 1e-30)
        torch.testing.assert_close(
            local[:rows], want, rtol=rtol, atol=rtol * scale, msg=lambda m, key=key: f"{what} {key}: {m}"
        )
        assert not local[rows:].any(), (what, key)  # the vocabulary's padding
        n += 1
    return n


def assert_tp_padding_zero(model, tp_mesh) -> int:
    """The rows that pad a TP-sharded vocabulary to a multiple of tp hold zeros in the live
    parameters (no checkpoint or import writes them: they must start so). Returns how many
    parameters had such rows on this rank."""
    from moemesh.parallel.checkpoint_state import _real_rows
    from moemesh.parallel.tags import TP_SHARD

    n = 0
    for name, p in model.named_parameters():
        tag = getattr(p, TP_SHARD, None)
        if tag is None or tp_mesh is None:
            continue
        dim, logical = tag
        local = p.data.to_local() if hasattr(p.data, "to_local") else p.data
        real = _real_rows(local, dim, logical, tp_mesh.get_local_rank()).shape[dim]
        pad = local.narrow(dim, real, local.shape[dim] - real)
        assert not pad.any(), f"{name}: {pad.shape[dim]} padding rows are not zero"
        n += pad.numel() > 0
    return n


def grad_entries(model, tp_mesh=None, fsdp_tp_mesh=None) -> dict:
    """This rank's gradients under the global keys its parameters have (checkpoint_state's)."""
    from moemesh.parallel.checkpoint_state import _entries

    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        out.update(_entries(name, p.grad, p, tp_mesh, fsdp_tp_mesh))
    return out


def moe_layer_count(cfg) -> int:
    return sum(1 for l in range(cfg.num_layers) if is_moe_layer(cfg, l))
