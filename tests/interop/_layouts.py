"""One imported model on one layout, checked against transformers: weights, logits, the loss
and the gradients of one training step (trainer.grad_clip=0, so the optimizer sees them as
reduced). Run by the single-process test and by each rank of the multi-rank ones."""

from __future__ import annotations

from math import prod
from pathlib import Path

import torch
import torch.distributed as dist

from moemesh.interop.hf.files import DTYPE_BYTES, tensor_index
from moemesh.interop.hf.load import load_weights
from moemesh.parallel.checkpoint_state import parameter_entries
from moemesh.parallel.dims import MeshAxis
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import build_training, train_step
from tests.helpers import cpu_context
from tests.interop._compare import assert_matches, assert_tp_padding_zero, grad_entries, hf_step, moe_layer_count
from tests.interop._hf_models import load_hf


def _logits(state, x: torch.Tensor) -> torch.Tensor | None:
    """This rank's logits of ``x`` (the vocabulary sharded under TP); under PP the last stage's
    (the first sends its hidden states), None elsewhere."""
    model, mesh = state.model, state.mesh
    if mesh.dims.pp == 1:
        with torch.no_grad():
            return model(x, return_logits=True).logits
    ranks = dist.get_process_group_ranks(mesh.pp_group)
    with torch.no_grad():
        if model.first:
            dist.send(model.stage_forward(x).contiguous(), ranks[1])
            out = None
        else:
            h = torch.empty(*x.shape, model.cfg.hidden_size)
            dist.recv(h, ranks[0])
            out = model.stage_forward(h)
    model.stage_records.clear()
    return out


def check_layout(run, rank: int, mesh, out_dir: Path, *, hf_dir: Path) -> dict:
    """Build the run (which imports ``hf_dir``), then check it against transformers; returns numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    state = build_training(run, cpu_context(rank, mesh, out_dir, paths))
    try:
        ckpt, cfg, t = state.ckpt, run.model, run.trainer
        # Read again as the trainer did, counting: each rank reads exactly the bytes of its own
        # boxes (fp32 source, no padding), and on several ranks less than the whole checkpoint.
        read = load_weights(state.model, cfg, seed=t.seed, tp_mesh=ckpt.tp_mesh, fsdp_tp_mesh=ckpt.fsdp_tp_mesh)
        assert read.bytes_read == read.own_bytes > 0, read
        total = sum(prod(i.shape) * DTYPE_BYTES[i.dtype] for i in tensor_index(hf_dir).values())
        assert read.own_bytes < total if mesh.dims.world_size > 1 else read.own_bytes <= total, (read, total)
        hf = load_hf(hf_dir)
        params = {n: p.detach() for n, p in hf.named_parameters()}
        weights = assert_matches(cfg, parameter_entries(state.model, ckpt.tp_mesh, ckpt.fsdp_tp_mesh), params, "weight")
        assert_tp_padding_zero(state.model, ckpt.tp_mesh)
        x, y = state.data.batch(
            "train", 0, global_batch=t.global_batch_size, seq_len=t.seq_len, start=0, count=t.global_batch_size
        )
        aux = cfg.aux_loss_factor / hf.config.num_experts_per_tok  # per layer, on transformers' aux
        ref_logits, ref_loss, ref_grads = hf_step(hf, x, y, aux_per_layer=aux, micro_steps=state.accum)
        logits = _logits(state, x)
        if logits is not None:
            tp = mesh.dims.tp
            r = mesh.coords[MeshAxis.TP] if tp > 1 else 0
            cols = logits.shape[-1]
            want = ref_logits[..., r * cols : (r + 1) * cols]
            torch.testing.assert_close(
                logits[..., : want.shape[-1]], want, rtol=1e-5, atol=1e-5 * float(ref_logits.abs().max())
            )
        captured: dict = {}
        state.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: captured.update(grad_entries(state.model, ckpt.tp_mesh, ckpt.fsdp_tp_mesh))
        )
        result = train_step(state, 0)
        assert abs(result.stats.loss - float(ref_loss)) <= 1e-5 * float(ref_loss), (result.stats.loss, float(ref_loss))
        grads = assert_matches(cfg, captured, ref_grads, "grad")
        return {"weights": weights, "grads": grads, "loss": result.stats.loss, "moe_layers": moe_layer_count(cfg)}
    finally:
        state.data.close()
