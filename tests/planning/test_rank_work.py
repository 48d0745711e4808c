"""The plan's work per rank (moemesh/planning/cost.py) against what one rank of the layout runs:
the products' FLOPs of a tensor-parallel rank and of each pipeline rank, the TP collectives'
bytes, and the weights' and gradients' collectives of a data rank (the reducer's, FSDP2's),
counted over a real forward and backward (tests/counting.py). A TP or data rank runs in a fake
world in this process; a pipeline rank is the model keeping that rank's layers.

Exact, less two things the planner counts that no product or collective of T x D is: the norms'
weights (counted as parameters, 2 FLOPs each per token forward, 6 with the backward, 2 more for a
recompute) and the all-reduces of one or two numbers a token or fewer (the router's expert counts,
the loss's maxima and sums, qk-norm's summed squares)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.moe.model import Transformer
from moemesh.moe.param_count import param_specs
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.pipeline import Placement
from moemesh.parallel.recompute import apply_activation_checkpointing
from moemesh.planning import cost
from tests.counting import CollectiveLog, MatmulFlops, fake_world
from tests.helpers import tiny_run

MICRO = 2  # sequences per micro-batch: 4 micro-steps of tiny_run's global batch of 8


def _run(**overrides):
    return tiny_run(**{"trainer.micro_batch_size": MICRO, **overrides})


def _tokens(run, batch=MICRO, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, run.model.vocab_size, (batch, run.trainer.seq_len), generator=g)


# Ring units of T x D: an all-reduce moves twice what an all-gather or a reduce-scatter moves.
RING_UNITS = {"c10d::allreduce_": 2, "c10d::allgather_": 1, "c10d::reduce_scatter_": 1}


def _tp_units(log: CollectiveLog, elements: int) -> int:
    """The ring units of the TP group's (size 2) collectives of ``elements`` (T x D) in ``log``."""
    return sum(RING_UNITS[name] for name, size, n in log.calls if size == 2 and n == elements)


def _tp_unit_bytes(log: CollectiveLog, elements: int) -> int:
    """The same units, each times its collective's bytes per element."""
    calls = zip(log.calls, log.widths, strict=True)
    return sum(RING_UNITS[name] * width for (name, size, n), width in calls if size == 2 and n == elements)


def _norm_flops_per_token(run, layers=None) -> int:
    """What the planner counts for the norms' weights of ``layers`` (all: None) per token."""
    specs = [s for s in param_specs(run.model) if len(s.shape) == 1]
    if layers is not None:
        specs = [s for s in specs if s.layer in layers or (s.layer is None and run.model.num_layers - 1 in layers)]
    checkpointed = run.trainer.activation_checkpointing != "none"
    return sum(s.numel * (6 + (2 if checkpointed and s.layer is not None else 0)) for s in specs)


TP_CASES = {
    "moe": (False, {}),
    "moe_sp": (True, {}),
    # trainer.dtype=auto plans bf16 (a GPU's) and runs under bf16 autocast here; fp32 throughout:
    "moe_fp32": (False, {"trainer.dtype": "fp32"}),
    "shared_gated_sp_fp32": (
        True,
        {"model.shared_expert_ffn_size": 16, "model.shared_expert_gate": True, "trainer.dtype": "fp32"},
    ),
    "dense_first_shared": (False, {"model.first_k_dense_layers": 1, "model.shared_expert_ffn_size": 16}),
    "dense_first_sp": (True, {"model.first_k_dense_layers": 1}),  # one MoE block: no token gathers
    "shared_gated_qknorm_sp": (
        True,
        {"model.shared_expert_ffn_size": 16, "model.shared_expert_gate": True, "model.qk_norm": "full"},
    ),
    # without SP every TP rank gates all its tokens; with full recompute the gate runs again
    "shared_gated_full_recompute": (
        False,
        {
            "model.shared_expert_ffn_size": 16,
            "model.shared_expert_gate": True,
            "trainer.activation_checkpointing": "full",
        },
    ),
    "dense_first_tied_qknorm": (
        False,
        {"model.first_k_dense_layers": 1, "model.tie_embeddings": True, "model.qk_norm": "head"},
    ),
    "mixed_full_recompute": (
        False,
        {
            "model.num_layers": 4,
            "model.moe_every_k_layers": 2,
            "model.shared_expert_ffn_size": 16,
            "trainer.activation_checkpointing": "full",
        },
    ),
    "mixed_selective_sp": (
        True,
        {"model.num_layers": 4, "model.moe_every_k_layers": 2, "trainer.activation_checkpointing": "selective"},
    ),
}


@pytest.mark.parametrize("case", TP_CASES)
def test_a_tp_ranks_products_and_collectives_are_the_plans(case):
    """tp2: the plan's FLOPs per rank are the products one TP rank runs for the step, and its TP
    traffic the collectives that rank issues: each one's T x D elements in ring units (an
    all-reduce 2, an all-gather or a reduce-scatter 1), at (tp-1)/tp of a unit per message step,
    in its own dtype's bytes: where the plan computes in bf16 (trainer.dtype auto plans a GPU's)
    the step runs under bf16 autocast, as the trainer's."""
    from moemesh.trainer.parallelize import build_model

    sp, extra = TP_CASES[case]
    run = _run(
        **{"parallel.name": "tp2", "parallel.tensor_parallel_size": 2, "parallel.sequence_parallel": sp, **extra}
    )
    dims = ParallelDims(tp=2)
    plan = cost.plan_one(run, dims)
    assert plan.problem is None, plan.problem
    with fake_world(2):
        from moemesh.parallel.mesh import build_mesh

        model = build_model(run, build_mesh(dims, "cpu"), torch.device("cpu"))
        tokens = _tokens(run)
        bf16 = cost.compute_bytes(run) == 2
        with MatmulFlops() as flops, CollectiveLog() as log:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(tokens, tokens).loss
            loss.backward()
    accum = run.trainer.global_batch_size // MICRO
    S, D = run.trainer.seq_len, run.model.hidden_size
    T = MICRO * S
    per_rank_tokens = run.trainer.global_batch_size * S / dims.world_size
    assert plan.terms.flops - per_rank_tokens * _norm_flops_per_token(run) == flops.get_total_flops() * accum
    # Every collective is a T x D one or one of two numbers a token or fewer; the former are the plan's.
    assert all(size == 2 and (n == T * D or n <= 2 * T) for _, size, n in log.calls), log.calls
    units, unit_bytes = _tp_units(log, T * D), _tp_unit_bytes(log, T * D)
    assert units > 0
    assert {w for w in log.widths} == ({2, 4, 8} if bf16 else {4, 8})  # 8: the router's int64 counts
    ring = 0.5 * T * D  # (tp-1)/tp of T x D elements
    assert plan.terms.comm["tp_intra"] == (unit_bytes * accum * ring, units * accum)


@pytest.mark.parametrize(("schedule", "v", "sp"), [("1f1b", 1, True), ("zbv", 2, False), ("zbv", 2, True)])
def test_each_pipeline_ranks_tp_collectives_are_its_stages_plan(schedule, v, sp):
    """pp2 x tp2 in a fake world of four: each pipeline rank's TP traffic in the plan is what its
    stages issue, the embedding's collectives on the rank of layer 0 and the head's on the rank
    of the last layer (a V's rank 0 holds both)."""
    from moemesh.parallel.dims import MeshAxis
    from moemesh.parallel.mesh import build_mesh
    from moemesh.trainer.parallelize import build_model

    overrides = {
        "parallel.name": "pp2_tp2",
        "parallel.pipeline_parallel_size": 2,
        "parallel.tensor_parallel_size": 2,
        "parallel.sequence_parallel": sp,
        "parallel.pipeline_schedule": schedule,
        "model.num_layers": 8,
        **({"parallel.pp_stages_per_rank": v} if v > 1 else {}),
    }
    run = _run(**overrides)
    dims = ParallelDims(tp=2, pp=2)
    plan = cost.plan_one(run, dims)
    assert plan.problem is None, plan.problem
    m, S = run.model, run.trainer.seq_len
    T, D, accum = MICRO * S, m.hidden_size, run.trainer.global_batch_size // MICRO
    placement = Placement.of(run.parallel)
    seen = set()
    for world_rank in (0, 2):  # tp rank 0 of each pipeline rank
        with fake_world(4, world_rank):
            mesh = build_mesh(dims, "cpu")
            rank = mesh.coords[MeshAxis.PP]
            model = build_model(run, mesh, torch.device("cpu"))
            with CollectiveLog() as log:
                for layers in placement.chunks(m.num_layers, rank):
                    shape = (MICRO, S // (2 if sp else 1), D)
                    x = _tokens(run) if layers[0] == 0 else torch.randn(shape, requires_grad=True)
                    y = model.stage_forward(x, layers)
                    y = y.float().logsumexp(-1).mean() if layers[-1] == m.num_layers - 1 else y
                    y.backward(torch.ones_like(y))
        units = _tp_units(log, T * D)
        assert plan.stage_terms[rank].comm["tp_intra"][1] == units * accum, (rank, units)
        seen.add(rank)
    assert seen == {0, 1}


def test_a_stage_sends_the_residual_stream_at_the_plans_width():
    """What a pipeline stage sends on (and so its input gradient back) under bf16 autocast: the
    fp32 residual stream, ``RESIDUAL_BYTES`` per element, which the plan prices its p2p at."""
    from moemesh.parallel.mesh import build_mesh
    from moemesh.planning.memory import RESIDUAL_BYTES
    from moemesh.trainer.parallelize import build_model

    run = _run(**{"parallel.name": "pp2", "parallel.pipeline_parallel_size": 2, "model.num_layers": 4})
    assert cost.compute_bytes(run) == 2
    with fake_world(2):
        model = build_model(run, build_mesh(ParallelDims(pp=2), "cpu"), torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model.stage_forward(_tokens(run), [0, 1])
    assert y.element_size() == RESIDUAL_BYTES and y.requires_grad


PP_CASES = {
    "1f1b_pp2": ("1f1b", 2, 1, {}),
    "gpipe_pp4": ("gpipe", 4, 1, {}),
    "interleaved_pp2_v2": ("interleaved_1f1b", 2, 2, {}),
    "zbv_tied": ("zbv", 2, 2, {"model.tie_embeddings": True}),
    "interleaved_selective": (
        "interleaved_1f1b",
        2,
        2,
        {
            "trainer.activation_checkpointing": "selective",
            "model.first_k_dense_layers": 1,
            "model.shared_expert_ffn_size": 16,
            "model.shared_expert_gate": True,
        },
    ),
    "1f1b_full_tied": (
        "1f1b",
        2,
        1,
        {"trainer.activation_checkpointing": "full", "model.tie_embeddings": True, "model.shared_expert_ffn_size": 16},
    ),
}


@pytest.mark.parametrize("case", PP_CASES)
def test_each_pipeline_ranks_products_are_its_stages_plan(case):
    """Each pipeline rank's FLOPs in the plan (its stage terms less the bubble's stretch) are the
    products its stages run over the step's micro-batches: its layers (V-shaped schedules: the
    first and the last stage on rank 0), the head where the last layer is (the tied embedding's
    projection too), and what its checkpointing repeats."""
    schedule, pp, v, extra = PP_CASES[case]
    overrides = {
        "parallel.name": f"pp{pp}",
        "parallel.pipeline_parallel_size": pp,
        "parallel.pipeline_schedule": schedule,
        "model.num_layers": 8,
        **({"parallel.pp_stages_per_rank": v} if v > 1 else {}),
        **extra,
    }
    run = _run(**overrides)
    dims = ParallelDims(pp=pp)
    plan = cost.plan_one(run, dims)
    assert plan.problem is None, plan.problem
    m, S = run.model, run.trainer.seq_len
    accum = run.trainer.global_batch_size // MICRO
    placement = Placement.of(run.parallel)
    per_rank_tokens = run.trainer.global_batch_size * S * pp / dims.world_size
    for rank, terms in enumerate(plan.stage_terms):
        model = Transformer(m)
        model.keep_layers(placement.rank_layers(m.num_layers, rank))
        apply_activation_checkpointing(model.layers, run.trainer.activation_checkpointing)
        with MatmulFlops() as flops:
            for layers in placement.chunks(m.num_layers, rank):  # each stage: its input, its output
                x = _tokens(run) if layers[0] == 0 else torch.randn(MICRO, S, m.hidden_size, requires_grad=True)
                y = model.stage_forward(x, layers)
                if layers[-1] == m.num_layers - 1:
                    y = F.cross_entropy(y.flatten(0, 1), _tokens(run).flatten())
                y.backward(torch.ones_like(y))
        held = set(placement.rank_layers(m.num_layers, rank))
        planned = terms.flops - terms.bubble_flops - per_rank_tokens * _norm_flops_per_token(run, held)
        assert planned == pytest.approx(flops.get_total_flops() * accum, rel=1e-12, abs=0), (rank, sorted(held))


SYNC_CASES = {
    "dp2_none": (2, 1, 1, "none"),
    "dp2_none_small_buckets": (2, 1, 1, "none"),  # BUCKET_BYTES 16 KiB: a bucket per block or two
    "tp2_dp2_none": (2, 1, 2, "none"),
    "dp2_zero2": (2, 1, 1, "zero2"),
    "ep2_dp2_zero3": (2, 2, 1, "zero3"),
    "tp2_dp2_sp_zero3": (2, 1, 2, "zero3"),  # the router and the norms in dp x tp units of their own
}


@pytest.mark.parametrize("case", SYNC_CASES)
def test_a_data_ranks_weight_and_gradient_collectives_are_the_plans(case, monkeypatch):
    """One rank of a fake world, a whole step (every micro-step, then the gradient reduction):
    the plan's "sync" (none's bucketed all-reduces; zero2/zero3's reduce-scatters, per unit and
    micro-step) and "gather" (zero2's weight all-gathers, zero3's twice) are the collectives FSDP2
    and the reducer issue, in elements and message steps, over the groups each parameter sums over.
    Under none the reducer issues one all-reduce per bucket of each group (the router's apart even
    at tp 1), and so does the plan."""
    from moemesh.parallel.mesh import build_mesh
    from moemesh.planning.calibration import collective
    from moemesh.planning.memory import REDUCE_BYTES
    from moemesh.trainer.parallelize import build_model, grad_reducer, param_groups, shard_model

    dp, ep, tp, mode = SYNC_CASES[case]
    if case.endswith("small_buckets"):
        from moemesh.parallel import buckets

        monkeypatch.setattr(buckets, "BUCKET_BYTES", 16 * 2**10)
    name = "_".join(f"{a}{n}" for a, n in (("tp", tp), ("ep", ep), ("dp", dp)) if n > 1)
    overrides = {
        "parallel.name": name,
        "parallel.data_parallel_size": dp,
        "parallel.expert_parallel_size": ep,
        "parallel.tensor_parallel_size": tp,
        "parallel.sequence_parallel": tp > 1,
        "parallel.sharding": mode,
        "model.shared_expert_ffn_size": 16,
        "trainer.micro_batch_size": 1,
    }
    run = tiny_run(**overrides)
    dims = ParallelDims(dp=dp, ep=ep, tp=tp)
    plan = cost.plan_one(run, dims)
    assert plan.problem is None, plan.problem
    accum = run.trainer.global_batch_size // (dp * ep)
    with fake_world(dims.world_size):
        mesh = build_mesh(dims, "cpu")
        model = build_model(run, mesh, torch.device("cpu"))
        reducer = (
            grad_reducer(param_groups(model), mesh)
            if shard_model(run, mesh, model, torch.device("cpu")) is None
            else None
        )
        tokens = _tokens(run, batch=1)
        with CollectiveLog() as step:
            for _ in range(accum):
                model(tokens, tokens).loss.backward()
        with CollectiveLog() as reduction:
            if reducer is not None:
                reducer.reduce()
    c = cost.compute_bytes(run)  # the plan's gathers are in the compute dtype, a reduction in fp32
    measured = {"sync": [0.0, 0], "gather": [0.0, 0]}
    calls = [("sync", "all_reduce", size, n) for _, size, n in reduction.calls]
    kinds = {
        "c10d::_reduce_scatter_base_": ("sync", "reduce_scatter"),
        "c10d::_allgather_base_": ("gather", "all_gather"),
    }
    calls += [(*kinds[op], size, n) for op, size, n in step.calls if op in kinds]
    for kind, op, size, n in calls:
        nbytes, steps = collective(op, n * (c if kind == "gather" else REDUCE_BYTES), size)
        measured[kind][0] += nbytes
        measured[kind][1] += steps
    planned = plan.terms.comm
    assert planned["sync_intra"][0] == pytest.approx(measured["sync"][0], rel=1e-12)
    assert planned["sync_intra"][1] == measured["sync"][1] > 0
    if mode == "none":
        assert "gather_intra" not in planned and all(op not in kinds for op, _, _ in step.calls)
        assert len(reduction.calls) == len(reducer.plan) > (5 if case.endswith("small_buckets") else 2)
    else:
        assert planned["gather_intra"] == pytest.approx(tuple(measured["gather"]), rel=1e-12)
        assert measured["gather"][1] == (2 if mode == "zero3" else 1) * measured["sync"][1]
