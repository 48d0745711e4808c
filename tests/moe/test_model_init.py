"""A model built on the meta device and materialised with ``to_empty`` starts exactly like
one built in place: ``init_weights`` sets every parameter and buffer."""

import torch

from moemesh.moe.config import ModelConfig
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
