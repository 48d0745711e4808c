"""Released-model import, family by family, against transformers' own model: a tiny random
model of each family is built and saved with transformers (offline), imported by moemesh's
trainer on a layout, and its weights, logits, loss and the gradients of one training step
(two micro-steps, the balance loss mapped per layer: docs/hf.md) equal transformers' to 1e-5
relative in fp32, on single and on ep2_dp2 (with activation checkpointing), ep2_dp2 under
zero3, tp2_ep2 (with sequence parallelism, under zero2) and pp2_ep2. Each rank reads exactly
the bytes of its own boxes."""

import subprocess
import sys
from pathlib import Path

import pytest

from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import build_mesh, single_rank_mesh
from tests.dist_utils import run_on_ranks
from tests.interop._hf_models import FAMILIES, hf_run, save_tiny
from tests.interop._layouts import check_layout

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_on_single_as_transformers_computes_it(tmp_path, family):
    d = save_tiny(family, tmp_path / family)
    got = check_layout(hf_run(d), 0, single_rank_mesh(), tmp_path / "run", hf_dir=d)
    assert got["grads"] == got["weights"] > 0


def test_the_fused_expert_layout_imports_like_the_per_expert_one(tmp_path):
    """transformers 5's in-memory layout (save_pretrained(save_original_format=False)): gate_up_proj
    [E, 2F, D] and down_proj [E, D, F], read expert by expert and split into gate and up."""
    d = save_tiny("qwen2_moe", tmp_path / "fused", fused=True)
    assert (d / "model.safetensors").exists()
    got = check_layout(hf_run(d), 0, single_rank_mesh(), tmp_path / "run", hf_dir=d)
    assert got["grads"] == got["weights"] > 0


# name: (dp, ep, tp, pp, extra overrides)
LAYOUTS = {
    "ep2_dp2": (2, 2, 1, 1, {"trainer.activation_checkpointing": "full"}),
    "ep2_dp2_zero3": (2, 2, 1, 1, {"parallel.sharding": "zero3"}),
    "tp2_ep2": (1, 2, 2, 1, {"parallel.sequence_parallel": True, "parallel.sharding": "zero2"}),
    "pp2_ep2": (1, 2, 1, 2, {}),
}


def _layouts_worker(rank, world, root, hf_dirs):
    for i, (name, (dp, ep, tp, pp, extra)) in enumerate(LAYOUTS.items()):
        d = Path(hf_dirs[i % len(hf_dirs)])
        dims = ParallelDims(dp=dp, ep=ep, tp=tp, pp=pp)
        run = hf_run(
            d,
            **{
                "parallel.name": name.removesuffix("_zero3"),
                "parallel.data_parallel_size": dp,
                "parallel.expert_parallel_size": ep,
                "parallel.tensor_parallel_size": tp,
                "parallel.pipeline_parallel_size": pp,
                **extra,
            },
        )
        got = check_layout(run, rank, build_mesh(dims, "cpu"), Path(root) / name, hf_dir=d)
        assert got["grads"] == got["weights"] > 0, (name, got)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_on_every_layout_as_transformers_computes_it(tmp_path, family):
    """4 ranks, one spawn per family, four layouts in turn (the per-expert checkpoint, and for
    the pipeline layout the fused one)."""
    dirs = [save_tiny(family, tmp_path / "per_expert"), save_tiny(family, tmp_path / "fused", fused=True)]
    run_on_ranks(_layouts_worker, 4, str(tmp_path), [str(dirs[0])] * 3 + [str(dirs[1])])


@pytest.mark.slow  # end to end (a script, or a fresh interpreter): a few seconds
@pytest.mark.shares_cores
def test_the_model_and_the_planner_import_without_transformers():
    """transformers and safetensors are needed only where a command names model.hf_path or exports."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, *args):\n"
        "        if name.split('.')[0] in ('transformers', 'safetensors'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import moemesh.moe.model, moemesh.planning, moemesh.interop.hf\n"
        "from moemesh.config.cli import compose_run\n"
        "compose_run(['model=tiny'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_expert_layout_is_read_from_the_first_moe_layer():
    """A checkpoint whose first layers are dense (Qwen2-MoE's mlp_only_layers, decoder_sparse_step)
    names its experts' layout only from its first MoE layer on."""
    from moemesh.interop.hf.names import MIXTRAL_LAYOUT, PROJ_LAYOUT, Layout, detect_layout
    from moemesh.moe.config import ModelConfig

    cfg = ModelConfig(
        name="t",
        vocab_size=64,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=48,
        moe_ffn_hidden_size=24,
        num_experts=4,
        top_k=2,
        first_k_dense_layers=1,
    )
    fused = {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.gate_up_proj"}
    assert detect_layout(fused, cfg, dense_source=False) == Layout("mlp", "fused")
    mixtral = {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.block_sparse_moe.experts.0.w1.weight"}
    assert detect_layout(mixtral, cfg, dense_source=False) == MIXTRAL_LAYOUT
    per_expert = {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.0.gate_proj.weight"}
    assert detect_layout(per_expert, cfg, dense_source=False) == PROJ_LAYOUT


def test_the_balance_loss_factor_divides_by_the_moe_layers_the_model_builds(tmp_path):
    """transformers pools the layers' balance loss into one; moemesh adds one per MoE layer, so the
    factor is divided by the MoE layers the imported model has: with decoder_sparse_step=2 and
    mlp_only_layers=[1], only layer 3 of 4 (a listed layer counts once, and only if it was MoE)."""
    from types import SimpleNamespace

    from moemesh.interop.hf.families import model_fields, read_config
    from moemesh.moe.config import is_moe_layer
    from tests.interop._hf_models import hf_config

    hf_config("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[1]).save_pretrained(tmp_path)
    raw, hf = read_config(tmp_path)
    arch, chosen = model_fields(tmp_path, raw, hf, {})
    layers = SimpleNamespace(**chosen)
    moe = [l for l in range(4) if is_moe_layer(layers, l)]
    assert moe == [3]
    assert chosen["aux_loss_factor"] == pytest.approx(raw["router_aux_loss_coef"] * arch["top_k"] / len(moe))


@pytest.mark.parametrize(("pad", "imported"), [(95, 95), (96, None), (-1, None)])
def test_a_pad_token_outside_the_vocabulary_is_not_imported(tmp_path, pad, imported):
    """config.json's pad_token_id becomes model.pad_token_id (the embedding row kept at zero) only
    if it names a row of the vocabulary (96 rows here); an id past it, or -1, imports as no pad token."""
    from moemesh.interop.hf.families import model_fields, read_config
    from tests.interop._hf_models import hf_config

    hf_config("mixtral", pad_token_id=pad).save_pretrained(tmp_path)
    raw, hf = read_config(tmp_path)
    assert raw["pad_token_id"] == pad
    assert model_fields(tmp_path, raw, hf, {})[1]["pad_token_id"] == imported
