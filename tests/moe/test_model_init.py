"""A model built on the meta device and materialised with ``to_empty`` starts exactly like
one built in place: ``init_weights`` sets every parameter and buffer."""

import math

import torch

from moemesh.moe.config import ModelConfig
from moemesh.moe.init import normal_
from moemesh.moe.model import Transformer


def test_meta_build_then_init_equals_eager_build_bitwise():
    cfg = ModelConfig(
        name="t", num_layers=4, moe_every_k_layers=2, shared_expert_ffn_size=16, expert_bias_update_rate=0.1
    )
    eager = Transformer(cfg)
    eager.init_weights(seed=5)
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights(seed=5)
    tensors = lambda m: {**dict(m.named_parameters()), **dict(m.named_buffers())}  # noqa: E731
    a, b = tensors(eager), tensors(meta)
    assert a.keys() == b.keys() and any("expert_bias_E" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_build_model_keeps_parameter_tags_and_equals_eager_init():
    from moemesh.parallel.mesh import single_rank_mesh
    from moemesh.trainer.parallelize import build_model
    from tests.helpers import tiny_run

    run = tiny_run(**{"model.shared_expert_ffn_size": 16})
    built = build_model(run, single_rank_mesh(), torch.device("cpu"))
    eager = Transformer(run.model)
    eager.init_weights(run.trainer.seed)
    ref = dict(eager.named_parameters())
    for name, p in built.named_parameters():
        assert vars(p) == vars(ref[name]) and torch.equal(p, ref[name]), name
    assert any(vars(p) for p in ref.values())  # the tags are there to keep


def test_residual_projections_start_scaled_down_by_the_depth():
    """GPT-2's init: each weight is a draw of std init_std keyed by (seed, name), except the
    projections back into the residual stream (attention's wo, the dense FFNs' and the shared
    experts' w2), whose std is init_std / sqrt(2 x layers)."""
    cfg = ModelConfig(name="t", num_layers=4, moe_every_k_layers=2, shared_expert_ffn_size=16, init_std=0.05)
    model = Transformer(cfg)
    model.init_weights(seed=5)
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    checked = []
    for name, p in model.named_parameters():
        if ".experts." in name or "norm" in name:
            continue
        std = out_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
        assert torch.equal(p, normal_(torch.empty(p.shape), std, seed=5, key=name)), name
        checked.append(name)
    assert {"layers.0.ffn.w2.weight", "layers.1.moe.shared.w2.weight", "layers.3.attn.wo.weight"} <= set(checked)
