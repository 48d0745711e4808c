"""Export: a moemesh checkpoint, saved on any layout, as a directory transformers loads.

Import then export gives bitwise the source's tensors (fp32 and bf16 sources); a model moemesh
trained from scratch (RoPE on interleaved pairs) or upcycled is written as the family that holds
its options and computes the same logits in transformers; a checkpoint trained on ep2_dp2 or on
tp2_ep2 under zero3 exports to the logits moemesh computes after resuming it on one process.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moemesh.errors import ConfigError
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import single_rank_mesh
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import build_training
from scripts import export_hf
from tests.dist_utils import run_on_ranks
from tests.helpers import cpu_context, tiny_run, train_rank
from tests.interop._hf_models import FAMILIES, hf_run, load_hf, save_tiny

ROOT = Path(__file__).resolve().parents[2]


def _saved_at_step_0(run, root: Path, x: torch.Tensor | None = None, edit=None):
    """The run built (an import reads its checkpoint) and saved before any step; with ``x``,
    also moemesh's logits of it; ``edit(model)`` changes its weights first."""
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    (root / "run").mkdir(parents=True)
    state = build_training(run, cpu_context(0, single_rank_mesh(), root / "run", paths))
    try:
        if edit is not None:
            with torch.no_grad():
                edit(state.model)
        if x is None:
            return state.ckpt.save(0)
        with torch.no_grad():
            logits = state.model(x, return_logits=True).logits
        return state.ckpt.save(0), logits
    finally:
        state.data.close()


def _logits(run, checkpoint: Path, x: torch.Tensor, root: Path) -> torch.Tensor:
    """moemesh's logits of ``x`` after resuming ``checkpoint`` on one process."""
    import dataclasses

    run = dataclasses.replace(run, resume=str(checkpoint), parallel=dataclasses.replace(run.parallel, name="single"))
    run = dataclasses.replace(
        run,
        parallel=dataclasses.replace(
            run.parallel,
            data_parallel_size=1,
            expert_parallel_size=1,
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            sharding="none",
            sequence_parallel=False,
        ),
    )
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    root.mkdir(parents=True)
    state = build_training(run, cpu_context(0, single_rank_mesh(), root, paths))
    try:
        with torch.no_grad():
            return state.model(x, return_logits=True).logits
    finally:
        state.data.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_the_sources_tensors_bitwise(tmp_path, family):
    src = save_tiny(family, tmp_path / "src")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    ckpt = _saved_at_step_0(hf_run(src), tmp_path)
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    # The source's config.json, every key as it was, but where it left one to transformers (null)
    was, now = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "out"))
    assert sorted(now) == sorted(was)
    assert {k: v for k, v in now.items() if was[k] is not None} == {k: v for k, v in was.items() if v is not None}
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path / "out")(x).logits, load_hf(src)(x).logits)


def test_a_model_trained_on_shorter_sequences_keeps_its_sources_context_length(tmp_path):
    """model.max_seq_len below the source's max_position_embeddings (fine-tuning on short
    sequences) sizes moemesh's RoPE tables, not the model: the export keeps the source's 64."""
    src = save_tiny("mixtral", tmp_path / "src")
    ckpt = _saved_at_step_0(hf_run(src, **{"model.max_seq_len": 32}), tmp_path)
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["max_position_embeddings"] == 64


def test_a_checkpoint_holding_adamws_moments_exports(tmp_path):
    """The export bounds what it reads by the model's size (every parameter and its two AdamW
    moments, in fp32): a checkpoint saved after a step holds all three."""
    from tests.parallel._checkpoint_kit import take_a_step

    run = tiny_run(**{"model.hidden_size": 64, "model.moe_ffn_hidden_size": 128})
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    (tmp_path / "run").mkdir()
    state = build_training(run, cpu_context(0, single_rank_mesh(), tmp_path / "run", paths))
    try:
        take_a_step(state.ckpt)
        ckpt = state.ckpt.save(1)
    finally:
        state.data.close()
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert load_file(tmp_path / "out" / "model.safetensors")


def test_a_bf16_source_round_trips_bitwise_and_shards_like_save_pretrained(tmp_path):
    """bf16 weights are held as fp32 (exact) and written back as bf16; small files get an index."""
    src = save_tiny("qwen3_moe", tmp_path / "src", dtype=torch.bfloat16)
    ckpt = _saved_at_step_0(hf_run(src), tmp_path)
    out = tmp_path / "out"
    assert export_hf.main([str(ckpt), "--out", str(out), "--max-shard-gb", "0.00005"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    b = {k: v for f in files for k, v in load_file(out / f).items()}
    a = load_file(src / "model.safetensors")
    assert sorted(a) == sorted(b) and all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(load_hf(out, torch.bfloat16)(x).logits, load_hf(src, torch.bfloat16)(x).logits)


SCRATCH = {  # a model moemesh initialised (RoPE on interleaved pairs), and the family it becomes
    "mixtral": {"model.head_dim": 12},  # heads of their own width: the config must say so
    "qwen3_moe": {"model.qk_norm": "head", "model.head_dim": 24, "model.tie_embeddings": True},
    "olmoe": {"model.qk_norm": "full", "model.renormalize": False},
    "qwen2_moe": {
        "model.qkv_bias": True,
        "model.shared_expert_ffn_size": 16,
        "model.shared_expert_gate": True,
        "model.first_k_dense_layers": 1,
        "model.num_layers": 3,
    },
}


@pytest.mark.parametrize("family", SCRATCH)
def test_a_model_trained_from_scratch_exports_to_the_same_logits(tmp_path, family):
    run = tiny_run(
        **{
            "model.vocab_size": 96,
            "model.num_experts": 4,
            "model.max_seq_len": 32,
            "model.pad_token_id": 0,
            **SCRATCH[family],
        }
    )
    x = torch.randint(0, 96, (2, 16))

    def trained(model):  # norms at one and biases at zero at step 0 hide a wrong order of their rows
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))

    ckpt, want = _saved_at_step_0(run, tmp_path, x, edit=trained)
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family and config["dtype"] == "float32"
    with torch.no_grad():
        got = load_hf(tmp_path / "out")(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# transformers' Qwen2-MoE always builds a shared expert: the upcycled Qwen2 gets an empty one.
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize(("dense", "family"), [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")])
def test_an_upcycled_model_exports_as_its_moe_family(tmp_path, dense, family):
    src = save_tiny(dense, tmp_path / "src")
    run = hf_run(src, **{"model.upcycle.num_experts": 4, "model.upcycle.top_k": 2})
    ckpt = _saved_at_step_0(run, tmp_path)
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family
    # The dense source's own keys (llama's mlp_bias, pretraining_tp) stay behind: only the family's
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    known = set(CONFIG_MAPPING[family]().to_dict()) | {"head_dim"}
    assert set(config) <= known, sorted(set(config) - known)
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():  # at step 0 it is still the dense model
        torch.testing.assert_close(load_hf(tmp_path / "out")(x).logits, load_hf(src)(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        ("sigmoid", "export as mixtral: model.score_func=sigmoid, which transformers' mixtral cannot express"),
        ("not_empty", "exists and is not an empty directory"),
        ("nothing", "no complete checkpoint"),
    ],
)
def test_export_mistakes_are_one_line_exit_2(tmp_path, capsys, setup, says):
    run = tiny_run(**({"model.score_func": "sigmoid"} if setup == "sigmoid" else {}))
    ckpt = _saved_at_step_0(run, tmp_path) if setup != "nothing" else tmp_path
    out = tmp_path / "out"
    if setup == "not_empty":
        out.mkdir()
        (out / "x").write_text("x")
    assert export_hf.main([str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_export_flags_and_a_tampered_meta_are_one_line_exit_2(tmp_path, capsys):
    ckpt = _saved_at_step_0(tiny_run(), tmp_path)
    (tmp_path / "file").write_text("")
    cases = [
        (["--max-shard-gb", "nan"], "--max-shard-gb=nan must be a size in GB, > 0 and <= 1e6"),
        (["--max-shard-gb", "inf"], "--max-shard-gb=inf must be a size in GB, > 0 and <= 1e6"),
        (["--tokenizer", str(tmp_path / "nope")], "--tokenizer=" + str(tmp_path / "nope") + ": not a directory"),
        # asked for, and none would come: it exported with a note, exit 0
        (["--tokenizer", str(tmp_path)], f"--tokenizer={tmp_path}: holds no tokenizer file (tokenizer.json, "),
        (["--out", str(tmp_path / "file" / "out")], "--out=" + str(tmp_path / "file" / "out")),
    ]
    for extra, says in cases:
        argv = [str(ckpt), "--out", str(tmp_path / "out"), *extra]
        assert export_hf.main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (extra, err)
    meta = json.loads((ckpt / "meta.json").read_text())
    for change, says in (
        ({"moe_ffn_hidden_size": 12}, "tensor model.layers.0.moe.experts.w1_eDF[0] is [32, 48], but the model"),
        ({"num_layers": "2"}, "meta.json's model is not a valid model config"),
    ):
        (ckpt / "meta.json").write_text(json.dumps({**meta, "model": {**meta["model"], **change}}))
        assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out")]) == 2, change
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (change, err)


def _word_tokenizer(d: Path, words: int) -> Path:
    """A tokenizer directory whose tokenizer.json has ``words`` ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    d.mkdir()
    Tokenizer(WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0")).save(str(d / "tokenizer.json"))
    return d


def test_a_tokenizer_with_more_ids_than_the_model_embeds_is_refused_before_writing(tmp_path, capsys):
    """It was copied without a word; transformers then failed with an IndexError at the first
    token past the embedding."""
    ckpt = _saved_at_step_0(tiny_run(), tmp_path)
    vocab = tiny_run().model.vocab_size
    big = _word_tokenizer(tmp_path / "big", vocab + 1)
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out"), "--tokenizer", str(big)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"has {vocab + 1:,} token ids, more than the checkpoint's model.vocab_size={vocab:,}" in err[0]
    )
    assert not (tmp_path / "out").exists()
    fits = _word_tokenizer(tmp_path / "fits", vocab)
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out"), "--tokenizer", str(fits)]) == 0


def test_the_exported_weights_are_as_readable_as_the_config(tmp_path, capsys):
    """safetensors writes its files 0600: a serving account that could read config.json could
    not read the weights. They follow the umask, as every other exported file does."""
    ckpt = _saved_at_step_0(tiny_run(), tmp_path)
    old = os.umask(0o022)
    try:
        assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out"), "--max-shard-gb", "1e-5"]) == 0
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()}
    assert len([n for n in modes if n.endswith(".safetensors")]) > 1
    assert set(modes.values()) == {0o644}, modes


def test_values_a_dtype_cannot_hold_are_refused_and_leave_no_directory(tmp_path, capsys):
    """fp16 tops out at 65,504: a weight beyond it would be written as inf. Refused in one line
    naming the tensor, and the half-written directory is removed; bf16 holds it."""

    def big(model):
        model.layers["1"].attn.wo.weight[0, 0] = 1e5

    ckpt = _saved_at_step_0(tiny_run(), tmp_path / "big", edit=big)
    nested = tmp_path / "new" / "a" / "out"  # its parents are made for it, and removed with it
    assert export_hf.main([str(ckpt), "--out", str(nested), "--dtype", "fp16", "--max-shard-gb", "1e-6"]) == 2
    assert not (tmp_path / "new").exists()
    capsys.readouterr()
    out = tmp_path / "out"
    assert export_hf.main([str(ckpt), "--out", str(out), "--dtype", "fp16", "--max-shard-gb", "1e-6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(
        r"--dtype=fp16: model\.layers\.1\.self_attn\.o_proj\.weight has values up to 1e\+05, beyond", err[0]
    )
    assert "write bf16 or fp32 instead" in err[0] and not out.exists()  # its earlier shards were written, then removed
    out.mkdir()  # an empty directory the user made stays, empty
    assert export_hf.main([str(ckpt), "--out", str(out), "--dtype", "fp16"]) == 2 and list(out.iterdir()) == []
    capsys.readouterr()
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0

    # inf or nan in the checkpoint itself: the saver refuses to write them (checkpoints.md), so
    # only a file from elsewhere holds them, and its message says so rather than blaming --dtype.
    from moemesh.interop.hf.export import _not_finite

    says = _not_finite(ckpt, "k", "model.embed_tokens.weight", torch.tensor([1e5]), "fp16", "auto")
    assert says.startswith("--dtype=auto (fp16, the source config's): model.embed_tokens.weight has values up to")
    t = torch.tensor([1.0, float("nan")])
    says = _not_finite(ckpt, "layers.0.attn.wq.weight", "model.layers.0.self_attn.q_proj.weight", t, "bf16")
    assert says == (
        f"checkpoint {ckpt}: layers.0.attn.wq.weight holds inf or nan values; "
        "export a checkpoint from before they appeared"
    )


def test_a_capacity_factor_is_named_as_left_out(tmp_path, capsys):
    ckpt = _saved_at_step_0(tiny_run(**{"model.capacity_factor": 1.25}), tmp_path)
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moemesh: note: model.capacity_factor=1.25 is not exported"), err


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"model.routed_scaling_factor": 2.5}, "model.routed_scaling_factor=2.5"),
        ({"model.router_groups": 2, "model.router_topk_groups": 1}, "group-limited routing (model.router_groups=2"),
        ({"model.max_ranks_per_token": 1}, "model.max_ranks_per_token=1"),
        ({"model.max_nodes_per_token": 1}, "model.max_nodes_per_token=1"),
        ({"model.expert_bias_update_rate": 0.001}, "model.expert_bias_update_rate > 0 (a selection bias"),
        ({"model.renormalize": False}, "model.renormalize=false"),
        ({"model.qkv_bias": True}, "model.qkv_bias=true"),
        ({"model.shared_expert_ffn_size": 16, "model.shared_expert_gate": True}, "a shared expert"),
    ],
)
def test_routing_transformers_does_not_do_is_refused(overrides, says):
    """Each of these changes which experts a token reaches, or its weights: an exported model
    would compute another function (a routed_scaling_factor of 2.5 moved the logits by 0.014)."""
    from moemesh.interop.hf.export import check_exportable

    with pytest.raises(ConfigError, match="export as mixtral: " + re.escape(says)):
        check_exportable(tiny_run(**overrides).model, "mixtral")
    check_exportable(tiny_run(**{"model.router_groups": 2}).model, "mixtral")  # groups, every one picked: plain top-k


def test_the_exported_aux_loss_coefficient_gives_moemeshs_balance_loss(tmp_path):
    """transformers pools every layer's router logits into one balance loss, top_k times
    moemesh's per layer; the exported ``router_aux_loss_coef`` scales it back (and by the MoE
    layers, which moemesh sums): with one MoE layer, coefficient x transformers' loss is
    moemesh's weighted one, so fine-tuning the export balances as the training did."""
    run = tiny_run(
        **{"model.num_layers": 1, "model.vocab_size": 96, "model.max_seq_len": 32, "model.aux_loss_factor": 0.01}
    )
    assert run.model.top_k == 2
    x = torch.randint(0, 96, (2, 16))
    stats = []
    ckpt = _saved_at_step_0(run, tmp_path, edit=lambda model: stats.extend(model(x).moe_stats))
    assert export_hf.main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    hf = load_hf(tmp_path / "out")
    with torch.no_grad():
        pooled = hf(x, output_router_logits=True).aux_loss
    want = run.model.aux_loss_factor * stats[0].losses.aux_loss
    torch.testing.assert_close(hf.config.router_aux_loss_coef * pooled, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("overrides", "family"),
    [
        ({}, "mixtral"),
        ({"model.qk_norm": "full"}, "olmoe"),
        ({"model.qk_norm": "head"}, "qwen3_moe"),
        ({"model.renormalize": False}, "qwen2_moe"),  # Mixtral always renormalises its top-k
        ({"model.qkv_bias": True}, "qwen2_moe"),
        ({"model.first_k_dense_layers": 1}, "qwen2_moe"),
    ],
)
def test_a_model_from_scratch_is_written_as_the_family_that_holds_its_options(overrides, family):
    from moemesh.interop.hf.export import check_exportable, infer_family

    cfg = tiny_run(**overrides).model
    assert infer_family(cfg) == family
    check_exportable(cfg, family)


@pytest.mark.parametrize(("family", "extra"), [("olmoe", {"model.qk_norm": "full"}), ("qwen2_moe", {})])
def test_heads_of_their_own_width_are_refused_where_the_family_derives_them(family, extra):
    """OLMoE's and Qwen2-MoE's attention take hidden_size / heads: a model.head_dim of its own
    would load into the wrong shapes."""
    from moemesh.interop.hf.export import check_exportable

    cfg = tiny_run(**{"model.head_dim": 12, **extra}).model
    with pytest.raises(
        ConfigError, match=re.escape(f"export as {family}: model.head_dim=12 (not hidden_size / heads)")
    ):
        check_exportable(cfg, family)
    check_exportable(tiny_run(**extra).model, family)


# Trained on these layouts, then exported: (dp, ep, tp, pp, sharding)
TRAINED = {"ep2_dp2": ("qwen2_moe", (2, 2, 1, 1, "none")), "tp2_ep2": ("olmoe", (1, 2, 2, 1, "zero3"))}


def _run(src, name, dp, ep, tp, pp, sharding):
    return hf_run(
        src,
        **{
            "parallel.name": name,
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "parallel.tensor_parallel_size": tp,
            "parallel.pipeline_parallel_size": pp,
            "parallel.sharding": sharding,
            "trainer.steps": 3,
            "trainer.lr": 1e-2,
            "checkpoint.save_final": True,
        },
    )


def _train_worker(rank, world, root, paths):
    for name, (family, spec) in TRAINED.items():
        out = Path(root) / name
        out.mkdir(exist_ok=True)
        train_rank(_run(Path(root) / family, name, *spec), rank, ParallelDims(*spec[:4]), out, paths)


@pytest.mark.slow
def test_a_model_trained_on_a_layout_exports_to_what_moemesh_computes(tmp_path):
    """3 steps on ep2_dp2 (Qwen2-MoE) and on tp2_ep2 under zero3 (OLMoE), 4 ranks; each checkpoint
    resumes on one process and exports; transformers' logits of the export equal moemesh's."""
    for family, _ in TRAINED.values():
        save_tiny(family, tmp_path / family)
    run0 = _run(tmp_path / "qwen2_moe", "ep2_dp2", 2, 2, 1, 1, "none")
    paths = prepare_data(run0.data, seq_len=run0.trainer.seq_len, vocab_size=run0.model.vocab_size)
    run_on_ranks(_train_worker, 4, str(tmp_path), paths)
    x = torch.randint(0, 96, (2, 16))
    for name, (family, spec) in TRAINED.items():
        ckpt_root = tmp_path / name / "checkpoints"
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "export_hf.py"),
                str(ckpt_root),
                "--out",
                str(tmp_path / f"{name}_hf"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0, proc.stderr
        assert f"as {family}" in proc.stdout
        want = _logits(_run(tmp_path / family, name, *spec), ckpt_root / "step_000003", x, tmp_path / f"{name}_single")
        with torch.no_grad():
            got = load_hf(tmp_path / f"{name}_hf")(x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        before = load_hf(tmp_path / family)(x).logits
        assert not torch.allclose(got, before, atol=1e-4)  # it trained
