"""Sparse upcycling: a dense Llama / Qwen2 / Qwen3 checkpoint becomes an MoE whose experts are
made from its FFN, and at step 0 the MoE computes the dense model (logits and loss equal
transformers' dense model to 1e-5): with copies (granularity 1) because the renormalised top-k
weights sum to 1, and fine-grained (granularity g) because each token picks whole copies, g parts
each with 1/g of the weight, of down projections scaled by g."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moemesh.errors import ConfigError
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import single_rank_mesh
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import build_training, train_step
from tests.dist_utils import run_on_ranks
from tests.helpers import cpu_context, train_rank, train_single
from tests.interop._hf_models import hf_run, load_hf, save_tiny


def _upcycled(d: Path, *, experts=4, top_k=2, granularity=1, **overrides):
    return hf_run(
        d,
        **{
            "model.upcycle.num_experts": experts,
            "model.upcycle.top_k": top_k,
            "model.upcycle.granularity": granularity,
            **overrides,
        },
    )


@pytest.mark.parametrize(("family", "granularity"), [("llama", 1), ("qwen2", 1), ("qwen3", 1), ("qwen3", 2)])
def test_the_upcycled_moe_computes_the_dense_model_at_step_0(tmp_path, family, granularity):
    d = save_tiny(family, tmp_path / family)
    run = _upcycled(d, experts=4, top_k=2 * granularity, granularity=granularity)
    m = run.model
    assert (m.num_experts, m.top_k, m.renormalize) == (4, 2 * granularity, True)
    assert m.moe_ffn_hidden_size * granularity == m.ffn_hidden_size
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=m.vocab_size)
    (tmp_path / "run").mkdir()
    state = build_training(run, cpu_context(0, single_rank_mesh(), tmp_path / "run", paths))
    try:
        t = run.trainer
        x, y = state.data.batch("train", 0, global_batch=t.global_batch_size, seq_len=t.seq_len, start=0, count=8)
        dense = load_hf(d)
        with torch.no_grad():
            want = dense(x).logits
            got = state.model(x, return_logits=True).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        layer = state.model.layers["0"].moe
        w = layer.experts.w1_eDF.detach()
        if granularity == 1:  # copies of the FFN, and routers random (a copy's parts share a row)
            assert all(torch.equal(w[0], w[e]) for e in range(4))
        else:
            assert torch.equal(w[0], w[2]) and not torch.equal(w[0], w[1])
        router = layer.router.weight_ED.detach()
        assert torch.equal(router[0], router[granularity - 1]) and not torch.equal(router[0], router[granularity])
        ce = torch.stack(
            [F.cross_entropy(dense(xm).logits.flatten(0, 1), ym.flatten()) for xm, ym in zip(x.chunk(2), y.chunk(2))]
        )
        result = train_step(state, 0)
        assert result.stats.loss == pytest.approx(float(ce.mean().detach()), rel=1e-5)
    finally:
        state.data.close()


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        ({"model.upcycle.num_experts": 0}, "a dense qwen3 model; set model.upcycle.num_experts"),
        (
            {"model.upcycle.granularity": 3, "model.upcycle.num_experts": 6, "model.upcycle.top_k": 3},
            "must divide the dense FFN's intermediate_size=64",
        ),
    ],
)
def test_upcycling_mistakes_are_one_line(tmp_path, setup, says):
    d = save_tiny("qwen3", tmp_path / "dense")
    with pytest.raises(ConfigError) as err:
        hf_run(d, **setup)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_an_moe_checkpoint_is_not_upcycled(tmp_path):
    d = save_tiny("mixtral", tmp_path / "moe")
    with pytest.raises(ConfigError, match="is already an MoE"):
        _upcycled(d)


STEPS = 3
# Tied embeddings (Qwen3's) under PP: the first stage's lookup and the last stage's head sum their
# gradients; under TP the head is the embedding's vocabulary shard.
LAYOUTS = {"pp2_ep2": (1, 2, 1, 2), "tp2_ep2": (1, 2, 2, 1), "ep2_dp2": (2, 2, 1, 1)}


def _run(d, name, dp=1, ep=1, tp=1, pp=1):
    return _upcycled(
        Path(d),
        **{
            "parallel.name": name,
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "parallel.tensor_parallel_size": tp,
            "parallel.pipeline_parallel_size": pp,
            "trainer.steps": STEPS,
            "trainer.grad_clip": 1.0,
            "trainer.lr": 1e-2,
        },
    )


def _worker(rank, world, root, d, paths):
    for name, (dp, ep, tp, pp) in LAYOUTS.items():
        out = Path(root) / name
        out.mkdir(exist_ok=True)
        train_rank(_run(d, name, dp, ep, tp, pp), rank, ParallelDims(dp=dp, ep=ep, tp=tp, pp=pp), out, paths)


def _read(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_an_upcycled_tied_model_trains_alike_on_every_layout(tmp_path):
    d = save_tiny("qwen3", tmp_path / "dense")
    ref_run = _run(d, "single")
    paths = prepare_data(ref_run.data, seq_len=ref_run.trainer.seq_len, vocab_size=ref_run.model.vocab_size)
    (tmp_path / "single").mkdir()
    train_single(ref_run, tmp_path / "single", paths)
    run_on_ranks(_worker, 4, str(tmp_path), str(d), paths)
    ref = _read(tmp_path / "single")
    assert len(ref) == STEPS
    for name in LAYOUTS:
        got = _read(tmp_path / name)
        for a, b in zip(ref, got):
            for key in ("loss", "aux_loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (name, a["step"], key)
