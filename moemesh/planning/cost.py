"""The planner's cost model: for a training config and a DP x EP x TP x PP split, what one rank
holds (``memory.py``), what a step moves over which link, and what that costs in time under
the constants of ``calibration.py`` (the priors, or those fitted to measured runs). Torch-free.

``scripts/plan.py`` is its command line and states the model in full (``--help``); the layout
sweep (``hydra/sweeper=layouts``, ``search.py``) and ``scripts/calibrate.py`` price with it too.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from moemesh.config.schema import RunConfig
from moemesh.config.validate import batch_plan, validate_run
from moemesh.errors import ConfigError
from moemesh.fields import Device, Dtype, PipelineSchedule, Recompute, Sharding, SharedExpertOverlap
from moemesh.moe.config import ModelConfig, is_moe_layer
from moemesh.moe.param_count import (
    Flops,
    ParamSpec,
    param_specs,
    shard_group_size,
    stage_flops_per_token,
    uneven_non_leading_shard,
)
from moemesh.parallel import buckets
from moemesh.parallel.dims import MESH_AXES, MeshAxis, ParallelDims, layout_name
from moemesh.parallel.pipeline import Placement, stages_per_rank
from moemesh.planning.calibration import PlannerOptions, Terms, cluster_constants, collective
from moemesh.planning.memory import (
    REDUCE_BYTES,
    RESIDUAL_BYTES,
    activation_bytes,
    recompute_flops_per_token,
    stage_state,
    transient_bytes,
)
from moemesh.planning.schedules import bubble_fraction, in_flight_stages

# The seed's two scenarios for 16 GPUs (presets ep2_dp8, ep8_dp2): always shown when valid.
SEED_SPLITS = (ParallelDims(dp=8, ep=2), ParallelDims(dp=2, ep=8))


@dataclass
class Plan:
    dims: ParallelDims
    problem: str | None = None  # why the split is invalid
    schedule: str | None = None  # the pipeline schedule priced (pp > 1; the run's or a swept one)
    param_expert: int = 0
    param_non_expert: int = 0
    grad_expert: int = 0
    grad_non_expert: int = 0
    optim_expert: int = 0
    optim_non_expert: int = 0
    transient_bytes: int = 0  # gathered weights and gradients in flight (sharded modes, autocast)
    act_bytes: int = 0  # activations under the run's trainer.activation_checkpointing
    a2a_bytes: int = 0
    ar_data_bytes: int = 0  # weights and gradients over the data group (dp x ep; dp x ep x tp parts too)
    ar_expert_bytes: int = 0  # over the expert-data group (dp x tp)
    bubble: float = 0.0
    compute_s: float = 0.0
    recompute_s: float = 0.0  # the part of compute_s that activation checkpointing adds
    comm_s: float = 0.0
    crosses: str = ""
    other_s: float = 0.0  # optimizer and per-step overhead: 0 unless calibrated (cluster.calibration)
    terms: Terms | None = None  # the step's work, as calibration.Terms: what the constants price
    stage_terms: list[Terms] = dataclasses.field(default_factory=list)  # each pipeline stage's (terms: the slowest)
    total_bytes: int = 0  # memory + transient + activations: what `fits` compares
    fits: bool = True

    @property
    def grad_bytes(self) -> int:
        return self.grad_expert + self.grad_non_expert

    @property
    def optim_bytes(self) -> int:
        return self.optim_expert + self.optim_non_expert

    @property
    def memory(self) -> int:
        """Parameters, gradients and optimizer state at rest (what a run's memory_per_rank counts)."""
        return self.param_expert + self.param_non_expert + self.grad_bytes + self.optim_bytes

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s + self.other_s


@dataclass(frozen=True)
class _StageWork:
    """One pipeline stage's step, per rank: what the constants price, and the traffic a plan reports."""

    terms: Terms
    a2a_bytes: int
    ar_data_bytes: int
    ar_expert_bytes: int
    recompute: Flops  # what activation checkpointing adds to the work (before the bubble's stretch)


# The most GPUs the planner splits: beyond any cluster built (the largest train on ~10^5), and
# planned in about a second (a count of 2^20 has 1,771 splits; time grows with the splits).
MAX_GPUS = 1 << 20


def check_gpus(gpus: int) -> None:
    """ConfigError naming cluster.gpus for a count the planner does not split."""
    if gpus > MAX_GPUS:
        raise ConfigError(f"cluster.gpus={gpus} is more than the planner splits ({MAX_GPUS:,}, 2^20)")


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending (trial division up to sqrt(n))."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def splits(gpus: int):
    """Every (dp, ep, tp, pp) whose product is ``gpus``: pp, then tp, then ep ascending."""
    for pp in divisors(gpus):
        for tp in divisors(gpus // pp):
            for ep in divisors(gpus // (pp * tp)):
                yield ParallelDims(dp=gpus // (pp * tp * ep), ep=ep, tp=tp, pp=pp)


def a2a_bytes(
    tokens: int, top_k: int, hidden: int, dtype_bytes: int, ep: int, moe_layers: int = 1, micro_steps: int = 1
) -> int:
    """Bytes one rank sends through the All-to-All per step, under uniform routing:
    (ep-1)/ep of its T*K pairs leave (dispatch forward, combine backward) and as many
    arrive and go back (combine forward, dispatch backward)."""
    return int(4 * tokens * top_k * (ep - 1) / ep * hidden * dtype_bytes * moe_layers * micro_steps)


def tp_units(m: ModelConfig, layers, sp: bool) -> tuple[int, int]:
    """A pipeline rank's TP traffic per micro-step, in ring units of T x D ((tp-1)/tp of it per
    message step; T the micro-batch's tokens on a data rank). Without SP an all-reduce is 2 units:
    attention and a dense FFN or shared expert each all-reduce their output forward and their
    input's gradient backward (q, k and v, or w1 and w3, read one copy of the input: 4 units); a
    MoE block's routed experts gather the TP peers' token slices forward and their gradients
    backward (2 all-gathers, 1 unit each); the vocabulary-parallel embedding all-reduces its
    output forward and the head its input's gradient backward (2 units each). Sequence parallelism
    trades each all-reduce for an all-gather and a reduce-scatter (the same bytes), and its MoE
    blocks route their own sequence shard: no token gathers. Without SP a shared expert's input
    gradient and the routed rows' gradients share one all-reduce, and a shared expert's output
    (a gate scales each rank's partial) and the routed rows' outputs another
    (``parallel.tp.split_and_copy_to_tp``, ``reduce_with_rows``): 4 units for the MoE part. The
    all-reduces of a number or two per token or expert (the router's expert counts, the loss's
    maxima and sums, qk-norm's squares) are left out.

    Returns (units, wide): ``wide`` of them, the embedding's output (the residual stream's start),
    move in the residual stream's dtype (``residual_bytes``: fp32 under bf16 autocast), the rest in
    the compute dtype (what only autocast's products read moves in theirs:
    ``parallel.tp.wire_dtype``). Held to the collectives a TP rank issues, and their dtypes, by
    tests/planning/test_rank_work.py."""
    moe = 4 if m.shared_expert_ffn_size else 0 if sp else 2
    units = sum(4 + (moe if is_moe_layer(m, l) else 4) for l in layers)
    embedding = 2 * (0 in layers)
    return units + embedding + 2 * (m.num_layers - 1 in layers), embedding


@functools.cache  # the planner asks each split's groups several times
def _crosses(dims: ParallelDims, axes, gpus_per_node: int) -> bool:
    """Whether the group along ``axes`` that holds rank 0 spans nodes (groups are translates
    of each other under the rank order, so one answers for all). Rank 0 sits on node 0, and a
    rank grows with each coordinate (row-major), so the group spans nodes exactly when its
    highest rank, every axis of the group at its last index, is off node 0."""
    last = {a: dims.size(a) - 1 if a in axes else 0 for a in MESH_AXES}
    return dims.rank_of(last) >= gpus_per_node


def _sync_cost(
    specs: list[ParamSpec], dims: ParallelDims, sharding: str, accum: int, c: int
) -> dict[str, dict[str, tuple[float, int]]]:
    """Weights and gradients per group kind ("data", "data_tp", "expert"), per collective kind:
    "sync" (none's all-reduce, zero2/zero3's reduce-scatter of the gradients) and "gather"
    (zero2/zero3's all-gathers of the weights, which run inside forward and backward, so a run
    times them as compute): (bytes this rank sends per step, collectives x ring steps for alpha)."""
    kinds: dict[str, list[ParamSpec]] = {"data": [], "data_tp": [], "expert": []}
    for s in specs:
        kinds["expert" if s.expert else "data_tp" if s.data_tp and dims.tp > 1 else "data"].append(s)
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for kind, group in kinds.items():
        if not group:
            continue
        n = shard_group_size(group[0], dims)
        if n == 1:
            out[kind] = {"sync": (0.0, 0)}
            continue
        numel = sum(s.numel for s in group)
        if sharding == Sharding.none:
            # After the backward the reducer all-reduces the fp32 gradients, one collective per
            # bucket, in the model's order, the data_tp parameters (the router's) apart even at tp 1.
            steps = 0
            for part in ([s for s in group if s.data_tp == d] for d in (False, True)):
                sizes = [s.numel * REDUCE_BYTES for s in part]
                steps += len(buckets.bucket_slices(sizes, buckets.BUCKET_BYTES)) * collective("all_reduce", 1, n)[1]
            out[kind] = {"sync": (collective("all_reduce", numel * REDUCE_BYTES, n)[0], steps)}
            continue
        units = (
            len({(s.layer, s.name.rsplit(".", 1)[0]) for s in group})
            if kind == "data_tp"
            else len({s.layer for s in group})
        )
        gathers = 2 if sharding == Sharding.zero3 else 1
        # Per micro-step, each unit reduce-scatters its gradients and gathers its weights (twice
        # under zero3: forward and backward).
        rs_bytes, rs_steps = collective("reduce_scatter", numel * REDUCE_BYTES, n)
        ag_bytes, ag_steps = collective("all_gather", numel * c, n)
        out[kind] = {
            "sync": (rs_bytes * accum, units * rs_steps * accum),
            "gather": (ag_bytes * gathers * accum, units * gathers * ag_steps * accum),
        }
    return out


def _replicated_gate(m: ModelConfig, dims: ParallelDims, sp: bool, tokens: float) -> float:
    """Without SP every TP rank computes a shared expert's gate ([T, D] x [D, 1]) on all T tokens,
    not 1/tp of them: the multiply-adds the even spread of ``tokens`` (per rank, summed over the
    gated blocks) leaves out, (tp-1) shares."""
    if not (m.shared_expert_gate and m.shared_expert_ffn_size) or dims.tp == 1 or sp:
        return 0.0
    return m.hidden_size * tokens * (dims.tp - 1)


def with_dims(run: RunConfig, dims: ParallelDims) -> RunConfig:
    """``run`` on the split ``dims``, as ``train_command`` runs it (stages balanced by layer count)."""
    parallel = dataclasses.replace(
        run.parallel,
        data_parallel_size=dims.dp,
        expert_parallel_size=dims.ep,
        tensor_parallel_size=dims.tp,
        pipeline_parallel_size=dims.pp,
        pipeline_split=None,
    )
    return dataclasses.replace(run, parallel=parallel)


def with_schedule(run: RunConfig, schedule: str | None) -> RunConfig:
    """``run`` under pipeline schedule ``schedule`` (None: as it is)."""
    if schedule is None:
        return run
    parallel = dataclasses.replace(run.parallel, pipeline_schedule=PipelineSchedule(schedule))
    return dataclasses.replace(run, parallel=parallel)


def plan_one(run: RunConfig, dims: ParallelDims, options: PlannerOptions | None = None) -> Plan:
    p = Plan(dims, schedule=str(run.parallel.pipeline_schedule) if dims.pp > 1 else None)
    candidate = with_dims(run, dims)
    try:
        validate_run(candidate)
    except ConfigError as err:
        p.problem = str(err)
        return p
    m, t, c = run.model, run.trainer, run.cluster
    sharding, ckpt = run.parallel.sharding, t.activation_checkpointing
    sp = run.parallel.sequence_parallel and dims.tp > 1
    cb = compute_bytes(run)
    plan = batch_plan(candidate)
    micro, accum = plan.micro_batch_size, plan.micro_steps
    T = micro * t.seq_len  # tokens per micro-batch per data rank
    schedule = run.parallel.pipeline_schedule
    placement = Placement(schedule, dims.pp, stages_per_rank(schedule, run.parallel.pp_stages_per_rank))
    in_flight = in_flight_stages(schedule, dims.pp, placement.v, accum)
    # What each pipeline rank holds: its stages' layers (balanced by layer count), one rank per entry.
    rank_layers = [placement.rank_layers(m.num_layers, r) for r in range(dims.pp)]
    all_specs = [param_specs(m, dims, layers=rank_layers[s], sequence_parallel=sp) for s in range(dims.pp)]
    if sharding != Sharding.none:
        bad = next((b for b in (uneven_non_leading_shard(sp_, dims) for sp_ in all_specs) if b), None)
        if bad is not None:
            p.problem = (
                f"parallel.sharding={sharding}: {bad.name} {list(bad.shape)} would be split unevenly along a dim "
                "other than 0, which FSDP2 refuses"
            )
            return p

    def stage_memory(stage: int):
        specs = all_specs[stage]
        state = stage_state(specs, dims, sharding)
        act = activation_bytes(m, rank_layers[stage], T, dims, sp, ckpt, in_flight, cb)
        trans = transient_bytes(specs, sharding, ckpt, cb)
        total = sum(state.params) + sum(state.grads) + sum(state.optim) + trans + act
        return total, state, trans, act

    # Memory: the stage whose rank needs the most. Time: the stage whose step takes longest (the
    # pipeline runs at its pace); a plan's traffic fields are that stage's.
    per_stage = [stage_memory(s) for s in range(dims.pp)]
    stage = max(range(dims.pp), key=lambda s: per_stage[s][0])
    p.total_bytes, state, p.transient_bytes, p.act_bytes = per_stage[stage]
    p.param_expert, p.param_non_expert = state.params
    p.grad_expert, p.grad_non_expert = state.grads
    p.optim_expert, p.optim_non_expert = state.optim
    p.bubble = bubble_fraction(schedule, dims.pp, placement.v, accum)
    k = cluster_constants(run.cluster, options or PlannerOptions())
    gpn = c.gpus_per_node
    overlap = run.parallel.comm_optimization
    # The shared expert runs after the routed experts unless it hides an All-to-All (moe/overlap.py).
    shared_expert_last = not (
        overlap.all_to_all_overlap and dims.ep > 1 and overlap.shared_expert_overlap != SharedExpertOverlap.none
    )

    def stage_work(stage: int) -> _StageWork:
        specs = all_specs[stage]
        layers = rank_layers[stage]
        moe = sum(1 for l in layers if is_moe_layer(m, l))
        D, K = m.hidden_size, m.top_k
        T_gpu = T // dims.tp  # TP peers route disjoint slices
        # All-to-All: rows leaving and arriving, uniform routing: (ep-1)/ep of the pairs are remote.
        a2a = a2a_bytes(T_gpu, K, D, cb, dims.ep, moe, accum)
        sync = _sync_cost(specs, dims, sharding, accum, cb)
        moved = {group: sum(b for b, _ in by_kind.values()) for group, by_kind in sync.items()}
        # Compute: the stage's training FLOPs spread evenly over its ranks (dp x ep x tp of them
        # share its tokens), plus what checkpointing repeats, stretched by the pipeline bubble.
        per_rank = t.global_batch_size * t.seq_len * dims.pp / dims.world_size
        stretch = 1 / (1 - p.bubble)
        flops = Flops(*(f * per_rank for f in stage_flops_per_token(m, t.seq_len, dims.pp, layers=layers)))
        re = Flops(
            *(
                f * per_rank
                for f in recompute_flops_per_token(
                    m, t.seq_len, ckpt, dims.pp, layers=layers, shared_expert_last=shared_expert_last
                )
            )
        )
        gate = _replicated_gate(m, dims, sp, moe * per_rank)
        flops = flops._replace(total=flops.total + 6 * gate)
        re = re._replace(total=re.total + (2 * gate if ckpt != Recompute.none else 0))
        # The step's collectives as (bytes this rank moves, alpha steps) per "<kind>_<link>", the
        # link class by whether the group crosses nodes; priced by the constants (prior or calibrated).
        comm: dict[str, tuple[float, float]] = {}

        def add(kind: str, axes, nbytes: float, steps: float) -> None:
            key = f"{kind}_{'inter' if _crosses(dims, axes, gpn) else 'intra'}"
            b, s = comm.get(key, (0.0, 0.0))
            comm[key] = (b + nbytes, s + steps)

        if dims.ep > 1:
            add("a2a", (MeshAxis.EP,), a2a, (dims.ep - 1) * 4 * moe * accum)
        if dims.tp > 1:
            units, wide = tp_units(m, layers, sp)
            ring = (dims.tp - 1) / dims.tp
            width = (units - wide) * cb + wide * residual_bytes(run)  # the units' bytes per element, summed
            add("tp", (MeshAxis.TP,), width * accum * ring * T * D, units * accum * (dims.tp - 1))
        if dims.pp > 1:
            # Each of the rank's stages sends its activations on and its input gradients back: the
            # residual stream (``residual_bytes``).
            sends = 2 * accum * placement.v
            add("p2p", (MeshAxis.PP,), sends * T * D * residual_bytes(run) // (dims.tp if sp else 1), sends)
        group_axes = {
            "data": (MeshAxis.DP, MeshAxis.EP),
            "data_tp": (MeshAxis.DP, MeshAxis.EP, MeshAxis.TP),
            "expert": (MeshAxis.DP, MeshAxis.TP),
        }
        for group, by_kind in sync.items():
            for kind, (nbytes, steps) in by_kind.items():
                add(kind, group_axes[group], nbytes, steps)
        _, st, _, _ = per_stage[stage]
        state_bytes = sum(st.params) + sum(st.grads) + sum(st.optim)
        total = (flops.total + re.total) * stretch
        terms = Terms(
            total,
            comm,
            state_bytes,
            bubble_flops=total * p.bubble,
            expert_flops=flops.experts + re.experts,
            attention_core_flops=flops.attention_core + re.attention_core,
        )
        return _StageWork(
            terms,
            a2a,
            int(moved.get("data", 0.0) + moved.get("data_tp", 0.0)),
            int(moved.get("expert", 0.0)),
            re,
        )

    work = [stage_work(s) for s in range(dims.pp)]
    w = max(work, key=lambda w: k.step_s(w.terms))
    p.terms, p.a2a_bytes, p.ar_data_bytes, p.ar_expert_bytes = w.terms, w.a2a_bytes, w.ar_data_bytes, w.ar_expert_bytes
    p.stage_terms = [s.terms for s in work]
    p.compute_s = k.compute_s(p.terms)
    re = w.recompute  # priced as the rest of the work: each kind at its rate, stretched by the bubble
    stretched = re.total / (1 - p.bubble)
    p.recompute_s = k.compute_s(
        Terms(
            stretched,
            bubble_flops=stretched * p.bubble,
            expert_flops=re.experts,
            attention_core_flops=re.attention_core,
        )
    )
    p.comm_s = k.comm_s(p.terms)
    p.other_s = k.other_s(p.terms)
    p.crosses = (
        ",".join(
            name
            for name, axes in (
                ("ep", (MeshAxis.EP,)),
                ("tp", (MeshAxis.TP,)),
                ("data", (MeshAxis.DP, MeshAxis.EP)),
                ("exp", (MeshAxis.DP, MeshAxis.TP)),
                ("pp", (MeshAxis.PP,)),
            )
            if dims.size(axes[0]) > 1 and _crosses(dims, axes, gpn)
        )
        or "-"
    )
    p.fits = p.total_bytes <= c.gpu_memory_gb * 1e9
    return p


def residual_bytes(run: RunConfig) -> int:
    """Bytes per element of the residual stream (what a pipeline stage sends; the embedding's TP
    output): fp32 under autocast, whose products alone compute in bf16; the compute dtype's under
    sharding, where FSDP gathers the weights in it and the embedding's output is in it."""
    return compute_bytes(run) if run.parallel.sharding != Sharding.none else RESIDUAL_BYTES


def compute_bytes(run: RunConfig) -> int:
    """Bytes per element of compute (activations, gathered weights): bf16 where training
    computes in it (trainer.dtype=bf16, or auto on a GPU, which the planner plans for)."""
    dtype, device = run.trainer.dtype, run.trainer.device
    return 2 if dtype == Dtype.bf16 or (dtype == Dtype.auto and device != Device.cpu) else 4


def make_plan(
    run: RunConfig, gpus: int, options: PlannerOptions | None = None, schedules: tuple[str, ...] = ()
) -> tuple[list[Plan], list[Plan]]:
    """(valid splits ranked: fitting ones by step time, then the rest; invalid ones); ConfigError
    for more than MAX_GPUS. With
    ``schedules``, each split with pp > 1 is planned once per schedule (a pipeline schedule is
    then a dimension of the search, as the layout sweeper's ``hydra.sweeper.schedules``)."""
    check_gpus(gpus)
    plans = [
        plan_one(with_schedule(run, s), d, options)
        for d in splits(gpus)
        for s in (schedules if schedules and d.pp > 1 else (None,))
    ]
    valid = [p for p in plans if p.problem is None]
    valid.sort(key=lambda p: (not p.fits, p.step_s, p.memory))
    return valid, [p for p in plans if p.problem is not None]


# Overrides the command sets itself; the user's own values for them are dropped.
SPLIT_KEYS = (
    "parallel.name",
    "parallel.data_parallel_size",
    "parallel.expert_parallel_size",
    "parallel.tensor_parallel_size",
    "parallel.pipeline_parallel_size",
    "parallel.pipeline_split",
)


def train_command(run: RunConfig, overrides: list[str], dims: ParallelDims, schedule: str | None = None) -> list[str]:
    """``python train.py`` for ``dims`` with the user's other overrides: composes to what was planned.

    ``parallel.name`` is required (the group's name is MISSING without a preset); the default
    preset, or the user's ``parallel=...``, supplies the other parallel keys (schedule, sequence
    parallel) unless ``schedule`` names the pipeline schedule. The plan balances pipeline stages by
    layer count, so a pipeline split is reset.
    """
    keys = SPLIT_KEYS + (("parallel.pipeline_schedule",) if schedule is not None else ())
    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys]
    split = [
        f"parallel.name={layout_name(dims)}",
        f"parallel.data_parallel_size={dims.dp}",
        f"parallel.expert_parallel_size={dims.ep}",
        f"parallel.tensor_parallel_size={dims.tp}",
        f"parallel.pipeline_parallel_size={dims.pp}",
    ]
    if run.parallel.pipeline_split is not None:
        split.append("parallel.pipeline_split=null")
    if schedule is not None:
        split.append(f"parallel.pipeline_schedule={schedule}")
    return ["python", "train.py", *split, *own]
