"""Plan before spending GPU hours: every valid DP x EP x TP x PP split, with what it costs.

    python scripts/plan.py model=seed_4096 cluster.gpus=16
    python scripts/plan.py model=seed_4096 cluster.gpus=16 parallel.sharding=zero3 trainer.activation_checkpointing=full
    python scripts/plan.py model=seed_4096 cluster.gpus=16 cluster.gpus_per_node=4 cluster.inter_node_gbps=25
    python scripts/plan.py model=seed_4096 cluster.gpus=1024 model.num_experts=256 --top 20 --png plan.png
    python scripts/plan.py model=seed_4096 cluster.gpus=16 --command 3   # row 3's train.py command

Every option that changes what a rank holds is the training config's own key, so the plan
costs what ``train.py`` with the same overrides builds: ``parallel.sharding`` (none |
zero2 | zero3), ``trainer.activation_checkpointing`` (none | full | selective) and
``trainer.dtype`` (auto and bf16: bf16 compute on the GPU; fp32).

The table shows the first --top rows (0: all) and, wherever they rank, the seed's two
scenarios (dp8 x ep2 and dp2 x ep8 of 16 GPUs); a line under it says how many rows were
left out. "total GB" is what "fits" compares with cluster.gpu_memory_gb: parameters +
gradients + optimizer state + transient buffers + activations, per GPU, all counted as if
alive at once (an upper bound on the peak). Under the table: the train.py command for the
best fitting split; --command N prints row N's alone. The command names the split
(parallel.name, e.g. pp2_dp8, in the presets' naming) and sets its four degrees on top of
the same overrides, so it composes without a preset for that split.

Per GPU (the busiest pipeline stage): parameters, gradients, AdamW state, transient
buffers and activations, each as scripts/_plan_memory.py's docstring states them; the
state is exact (a test builds the real model on the meta device for every preset and
mode, shards it as training does and compares each rank's local bytes), the rest an
estimate whose parts are named there.

Then All-to-All bytes per step, the bytes each rank moves over the data (dp x ep) and the
expert-data (dp x tp) groups for weights and gradients, and the pipeline bubble. Step time
comes from a simple model, stated here so it can be argued with:

  compute   = training FLOPs per GPU / (peak FLOP/s x --mfu), stretched by 1/(1 - bubble);
            activation checkpointing adds the recomputed forward's FLOPs (recompute_flops_per_token):
            full recomputes every block's forward (about 1/3 more: forward is 2 of the 6 x
            params FLOPs), selective all but the attention core and the expert matmuls
  a collective of B bytes over n ranks costs  alpha x steps + B' / bandwidth,
            B' = 2 (n-1)/n B for a ring all-reduce (steps = 2 (n-1)), (n-1)/n B for a ring
            all-gather or reduce-scatter (steps = n - 1), and for an All-to-All the bytes
            this rank sends (steps = n - 1);
  bandwidth = cluster.intra_node_gbps if the group's ranks share a node under the mesh's
            rank order (tp innermost, then ep, dp, pp), else cluster.inter_node_gbps;
  weights and gradients, over each group, B = the group's (unsharded) parameters:
            none   one all-reduce of the fp32 gradients per step (after the backward);
            zero2  per micro-step an all-gather of the weights (c bytes each) and a
                   reduce-scatter of the fp32 gradients (half a ring all-reduce's bytes);
            zero3  per micro-step two all-gathers (forward and backward) and a reduce-scatter;
            alpha counts one collective per FSDP unit (one for the bucketed all-reduce);
  TP: 4 all-reduces of the activations per layer (2 forward, 2 backward);
  PP: each micro-batch sends its activations forward and their gradients back,
            T x D per stage boundary each way (point to point, over the pp axis's link);
  step      = compute + All-to-All + TP + PP + weights and gradients: no overlap assumed.
            FSDP2 prefetches all-gathers and runs reduce-scatters beside the backward, so a
            real sharded step lies between compute alone and this sum.

The constants (peak x --mfu, one bandwidth per link class, one latency) are guesses for your
hardware. ``cluster=calibrated/<name>`` replaces them with constants fitted to measured runs
(``scripts/calibrate.py`` on a layout sweep, ``python train.py -m hydra/sweeper=layouts``, or on
``scripts/bench_comm.py``): the achieved FLOP/s, GB/s and latency per collective kind (a2a, sync,
tp, p2p) and link class (intra, inter), the share of the pipeline bubble that costs time (1 on
devices that idle in it), plus two terms a measured step has and the GPU model leaves out, the
optimizer (s per GB of state) and a fixed per-step overhead. The line under the plan's first says
which constants it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import shlex
import sys
import time
from dataclasses import dataclass

from _calibrate import Terms, cluster_constants, constants_line
from _config import compose_run
from _plan_memory import (
    REDUCE_BYTES,
    activation_bytes,
    recompute_flops_per_token,
    stage_state,
    transient_bytes,
)

from moemesh.config.schema import RunConfig
from moemesh.config.validate import grad_accum_steps, micro_batch_size, validate_run
from moemesh.errors import ConfigError
from moemesh.moe.config import is_moe_layer
from moemesh.moe.param_count import (
    ParamSpec,
    count_params,
    model_flops_per_token,
    param_specs,
    shard_group_size,
    uneven_non_leading_shard,
)
from moemesh.parallel.dims import MESH_AXES, MeshAxis, ParallelDims, layout_name
from moemesh.parallel.pipeline import stage_layers

# The seed's two scenarios for 16 GPUs (presets ep2_dp8, ep8_dp2): always shown when valid.
SEED_SPLITS = (ParallelDims(dp=8, ep=2), ParallelDims(dp=2, ep=8))
# The planner options that became config keys: each old flag fails, naming its key.
GONE_FLAGS = {
    "--zero1": "parallel.sharding=zero2 (gradients and optimizer state sharded) or parallel.sharding=zero3",
    "--activation-checkpointing": "trainer.activation_checkpointing=full or trainer.activation_checkpointing=selective",
    "--precision": "trainer.dtype=fp32 or trainer.dtype=bf16 (auto: bf16 on the GPU)",
}


@dataclass
class Plan:
    dims: ParallelDims
    problem: str | None = None  # why the split is invalid
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
    terms: Terms | None = None  # the step's work, as _calibrate.Terms: what the constants price
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


def splits(gpus: int):
    """Every (dp, ep, tp, pp) whose product is ``gpus``."""
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    for pp in divisors:
        for tp in divisors:
            for ep in divisors:
                rest, rem = divmod(gpus, pp * tp * ep)
                if rem == 0 and rest >= 1:
                    yield ParallelDims(dp=rest, ep=ep, tp=tp, pp=pp)


def a2a_bytes(
    tokens: int, top_k: int, hidden: int, dtype_bytes: int, ep: int, moe_layers: int = 1, micro_steps: int = 1
) -> int:
    """Bytes one rank sends through the All-to-All per step, under uniform routing:
    (ep-1)/ep of its T*K pairs leave (dispatch forward, combine backward) and as many
    arrive and go back (combine forward, dispatch backward)."""
    return int(4 * tokens * top_k * (ep - 1) / ep * hidden * dtype_bytes * moe_layers * micro_steps)


@functools.cache  # the planner asks each split's groups several times
def _crosses(dims: ParallelDims, axes, gpus_per_node: int) -> bool:
    """Whether the group along ``axes`` that holds rank 0 spans nodes (groups are translates
    of each other under the rank order, so one answers for all)."""
    ranges = [range(dims.size(a)) if a in axes else range(1) for a in MESH_AXES]
    group = [dims.rank_of(dict(zip(MESH_AXES, c, strict=True))) for c in itertools.product(*ranges)]
    return len({r // gpus_per_node for r in group}) > 1


def _sync_cost(
    specs: list[ParamSpec], dims: ParallelDims, sharding: str, accum: int, c: int
) -> dict[str, tuple[float, int]]:
    """Weights and gradients per group kind ("data", "data_tp", "expert"): (bytes this rank
    sends per step, collectives x ring steps for alpha)."""
    kinds: dict[str, list[ParamSpec]] = {"data": [], "data_tp": [], "expert": []}
    for s in specs:
        kinds["expert" if s.expert else "data_tp" if s.data_tp and dims.tp > 1 else "data"].append(s)
    out: dict[str, tuple[float, int]] = {}
    for kind, group in kinds.items():
        if not group:
            continue
        n = shard_group_size(group[0], dims)
        if n == 1:
            out[kind] = (0.0, 0)
            continue
        numel = sum(s.numel for s in group)
        ring = (n - 1) / n
        if sharding == "none":  # one bucketed all-reduce of fp32 gradients after the backward
            out[kind] = (2 * ring * numel * REDUCE_BYTES, 2 * (n - 1))
            continue
        units = (
            len({(s.layer, s.name.rsplit(".", 1)[0]) for s in group})
            if kind == "data_tp"
            else len({s.layer for s in group})
        )
        gathers = 2 if sharding == "zero3" else 1
        per_micro = ring * numel * (gathers * c + REDUCE_BYTES)
        out[kind] = (per_micro * accum, units * (gathers + 1) * (n - 1) * accum)
    return out


def plan_one(run: RunConfig, dims: ParallelDims, args) -> Plan:
    p = Plan(dims)
    candidate = dataclasses.replace(
        run,
        parallel=dataclasses.replace(
            run.parallel,
            data_parallel_size=dims.dp,
            expert_parallel_size=dims.ep,
            tensor_parallel_size=dims.tp,
            pipeline_parallel_size=dims.pp,
            pipeline_split=None,
        ),
    )
    try:
        validate_run(candidate)
    except ConfigError as err:
        p.problem = str(err)
        return p
    m, t, c = run.model, run.trainer, run.cluster
    sharding, ckpt = run.parallel.sharding, t.activation_checkpointing
    sp = run.parallel.sequence_parallel and dims.tp > 1
    cb = compute_bytes(run)
    micro, accum = micro_batch_size(candidate), grad_accum_steps(candidate)
    T = micro * t.seq_len  # tokens per micro-batch per data rank
    in_flight = min(dims.pp, accum) if run.parallel.pipeline_schedule == "1f1b" else accum
    all_specs = [param_specs(m, dims, stage=s, sequence_parallel=sp) for s in range(dims.pp)]
    if sharding != "none":
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
        layers = stage_layers(m.num_layers, dims.pp)[stage]
        act = activation_bytes(m, layers, T, dims, sp, ckpt, in_flight, cb)
        trans = transient_bytes(specs, sharding, ckpt, cb)
        total = sum(state.params) + sum(state.grads) + sum(state.optim) + trans + act
        return total, state, trans, act

    # The busiest stage: the one whose rank needs the most memory.
    per_stage = [stage_memory(s) for s in range(dims.pp)]
    stage = max(range(dims.pp), key=lambda s: per_stage[s][0])
    p.total_bytes, state, p.transient_bytes, p.act_bytes = per_stage[stage]
    p.param_expert, p.param_non_expert = state.params
    p.grad_expert, p.grad_non_expert = state.grads
    p.optim_expert, p.optim_non_expert = state.optim
    specs = all_specs[stage]
    layers = stage_layers(m.num_layers, dims.pp)[stage]
    moe = sum(1 for l in layers if is_moe_layer(m, l))
    D, K = m.hidden_size, m.top_k
    T_gpu = T // dims.tp  # TP peers route disjoint slices
    # All-to-All: rows leaving and arriving, uniform routing: (ep-1)/ep of the pairs are remote.
    p.a2a_bytes = a2a_bytes(T_gpu, K, D, cb, dims.ep, moe, accum)
    sync = _sync_cost(specs, dims, sharding, accum, cb)
    p.ar_data_bytes = int(sync.get("data", (0.0, 0))[0] + sync.get("data_tp", (0.0, 0))[0])
    p.ar_expert_bytes = int(sync.get("expert", (0.0, 0))[0])
    p.bubble = (dims.pp - 1) / (accum + dims.pp - 1)
    # Compute: the model's training FLOPs spread evenly over the GPUs, plus what checkpointing repeats.
    tokens = t.global_batch_size * t.seq_len
    stretch = 1 / (1 - p.bubble)
    flops = model_flops_per_token(m, t.seq_len) * tokens / dims.world_size * stretch
    reflops = recompute_flops_per_token(m, t.seq_len, ckpt) * tokens / dims.world_size * stretch
    gpn = c.gpus_per_node
    # The step's collectives as (bytes this rank moves, alpha steps) per "<kind>_<link>", the
    # link class by whether the group crosses nodes; priced by the constants (prior or calibrated).
    comm: dict[str, tuple[float, float]] = {}

    def add(kind: str, axes, nbytes: float, steps: float) -> None:
        key = f"{kind}_{'inter' if _crosses(dims, axes, gpn) else 'intra'}"
        b, s = comm.get(key, (0.0, 0.0))
        comm[key] = (b + nbytes, s + steps)

    if dims.ep > 1:
        add("a2a", (MeshAxis.EP,), p.a2a_bytes, (dims.ep - 1) * 4 * moe * accum)
    if dims.tp > 1:
        tp_bytes = 4 * len(layers) * accum * 2 * (dims.tp - 1) / dims.tp * T * D * cb
        add("tp", (MeshAxis.TP,), tp_bytes, 4 * len(layers) * accum * 2 * (dims.tp - 1))
    if dims.pp > 1:
        p2p_bytes = 2 * accum * T * D * cb // (dims.tp if sp else 1)
        add("p2p", (MeshAxis.PP,), p2p_bytes, 2 * accum)
    group_axes = {
        "data": (MeshAxis.DP, MeshAxis.EP),
        "data_tp": (MeshAxis.DP, MeshAxis.EP, MeshAxis.TP),
        "expert": (MeshAxis.DP, MeshAxis.TP),
    }
    for kind, (nbytes, steps) in sync.items():
        add("sync", group_axes[kind], nbytes, steps)
    p.terms = Terms(flops + reflops, comm, p.memory, bubble_flops=(flops + reflops) * p.bubble)
    k = cluster_constants(run.cluster, args)
    p.compute_s = k.compute_s(p.terms)
    p.recompute_s = reflops / k.flops_per_s
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


def compute_bytes(run: RunConfig) -> int:
    """Bytes per element of compute (activations, gathered weights): bf16 where training
    computes in it (trainer.dtype=bf16, or auto on a GPU, which the planner plans for)."""
    dtype, device = run.trainer.dtype, run.trainer.device
    return 2 if dtype == "bf16" or (dtype == "auto" and device != "cpu") else 4


def make_plan(run: RunConfig, gpus: int, args) -> tuple[list[Plan], list[Plan]]:
    """(valid splits ranked: fitting ones by step time, then the rest; invalid ones)."""
    plans = [plan_one(run, d, args) for d in splits(gpus)]
    valid = [p for p in plans if p.problem is None]
    valid.sort(key=lambda p: (not p.fits, p.step_s, p.memory))
    return valid, [p for p in plans if p.problem is not None]


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def shown_rows(valid: list[Plan], top: int) -> list[int]:
    """1-based ranks of the rows to print: the first ``top`` (0: all), then any seed scenario below the cut."""
    cut = len(valid) if top <= 0 else min(top, len(valid))
    return list(range(1, cut + 1)) + [i for i, p in enumerate(valid[cut:], cut + 1) if p.dims in SEED_SPLITS]


def table(valid: list[Plan], top: int) -> str:
    head = (
        "| # | dp | ep | tp | pp | fits | total GB | step s | compute s | comm s | bubble | expert GB | "
        "non-exp GB | grad GB | optim GB | transient GB | act GB | All-to-All GB | data sync GB | exp sync GB | "
        "off-node groups |"
    )
    lines = [head, "|" + "---|" * 21]
    rows = shown_rows(valid, top)
    for i in rows:
        p = valid[i - 1]
        d = p.dims
        mark = " (seed)" if d in SEED_SPLITS else ""
        lines.append(
            f"| {i}{mark} | {d.dp} | {d.ep} | {d.tp} | {d.pp} | {'yes' if p.fits else 'NO'} | {_gb(p.total_bytes)} | "
            f"{p.step_s:.3f} | {p.compute_s:.3f} | {p.comm_s:.3f} | {p.bubble:.0%} | {_gb(p.param_expert)} | "
            f"{_gb(p.param_non_expert)} | {_gb(p.grad_bytes)} | {_gb(p.optim_bytes)} | {_gb(p.transient_bytes)} | "
            f"{_gb(p.act_bytes)} | {_gb(p.a2a_bytes)} | {_gb(p.ar_data_bytes)} | {_gb(p.ar_expert_bytes)} | "
            f"{p.crosses} |"
        )
    if len(rows) < len(valid):
        lines.append(f"... {len(valid) - len(rows)} more splits not shown (--top {top}); --top 0 shows all")
    return "\n".join(lines)


# Overrides the command sets itself; the user's own values for them are dropped.
_SPLIT_KEYS = (
    "parallel.name",
    "parallel.data_parallel_size",
    "parallel.expert_parallel_size",
    "parallel.tensor_parallel_size",
    "parallel.pipeline_parallel_size",
    "parallel.pipeline_split",
)


def train_command(run: RunConfig, overrides: list[str], dims: ParallelDims) -> list[str]:
    """``python train.py`` for ``dims`` with the user's other overrides: composes to what was planned.

    ``parallel.name`` is required (the group's name is MISSING without a preset); the default
    preset, or the user's ``parallel=...``, supplies the other parallel keys (schedule, sequence
    parallel). The plan balances pipeline stages by layer count, so a pipeline split is reset.
    """
    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _SPLIT_KEYS]
    split = [
        f"parallel.name={layout_name(dims)}",
        f"parallel.data_parallel_size={dims.dp}",
        f"parallel.expert_parallel_size={dims.ep}",
        f"parallel.tensor_parallel_size={dims.tp}",
        f"parallel.pipeline_parallel_size={dims.pp}",
    ]
    if run.parallel.pipeline_split is not None:
        split.append("parallel.pipeline_split=null")
    return ["python", "train.py", *split, *own]


def gone_flag(argv: list[str]) -> str | None:
    """The one-line error for a planner flag that became a config key, or None."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in GONE_FLAGS:
            return f"moemesh: {flag} is gone: the planner reads the training config's keys; use {GONE_FLAGS[flag]}"
    return None


def _png(valid: list[Plan], path: str, top: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [valid[i - 1] for i in shown_rows(valid, top)]
    labels = [f"dp{p.dims.dp} ep{p.dims.ep} tp{p.dims.tp} pp{p.dims.pp}" for p in shown]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(shown) + 1.5))
    ax.barh(labels, [p.compute_s for p in shown], label="compute (incl. bubble)")
    ax.barh(labels, [p.comm_s for p in shown], left=[p.compute_s for p in shown], label="communication")
    for i, p in enumerate(shown):
        if not p.fits:
            ax.text(p.step_s, i, " does not fit", va="center", color="red")
    ax.invert_yaxis()
    ax.set_xlabel("estimated step time (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    gone = gone_flag(argv)
    if gone:
        print(gone, file=sys.stderr)
        raise SystemExit(2)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=seed_4096 cluster.gpus=16")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for compute")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="per GPU, when cluster.peak_flops is unset")
    ap.add_argument("--top", type=int, default=25, help="rows shown (0: all); the seed's scenarios always are")
    ap.add_argument("--command", type=int, metavar="N", help="print only row N's train.py command")
    ap.add_argument("--png", metavar="FILE")
    args = ap.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    run = compose_run(args.overrides)
    gpus = run.cluster.gpus
    if not gpus or gpus < 1:
        print(
            "moemesh: config error: cluster.gpus must be set to a positive count, e.g. cluster.gpus=16", file=sys.stderr
        )
        raise SystemExit(2)
    t0 = time.perf_counter()
    valid, invalid = make_plan(run, gpus, args)
    if args.command is not None:
        if not 1 <= args.command <= len(valid):
            print(
                f"moemesh: --command {args.command}: the plan has {len(valid)} rows (1..{len(valid)})", file=sys.stderr
            )
            raise SystemExit(2)
        p = valid[args.command - 1]
        print(shlex.join(train_command(run, args.overrides, p.dims)))
        if not p.fits:
            print(
                f"moemesh: row {args.command} does not fit: {_gb(p.total_bytes)} GB per GPU > "
                f"cluster.gpu_memory_gb={run.cluster.gpu_memory_gb:g}",
                file=sys.stderr,
            )
        return
    m = run.model
    print(
        f"plan: model={m.name} ({count_params(m).total / 1e9:.2f}B params, {m.num_experts} experts top-{m.top_k}), "
        f"{gpus} GPUs ({run.cluster.gpus_per_node}/node, {run.cluster.gpu_memory_gb:g} GB), "
        f"NVLink {run.cluster.intra_node_gbps:g} GB/s, network {run.cluster.inter_node_gbps:g} GB/s, "
        f"compute {'bf16' if compute_bytes(run) == 2 else 'fp32'} (trainer.dtype={run.trainer.dtype}), "
        f"parallel.sharding={run.parallel.sharding}, "
        f"trainer.activation_checkpointing={run.trainer.activation_checkpointing}"
    )
    print(constants_line(run.cluster, args))
    print(
        f"{len(valid)} valid splits ({sum(p.fits for p in valid)} fit in memory), {len(invalid)} cannot run; "
        f"planned in {time.perf_counter() - t0:.2f} s"
    )
    print(table(valid, args.top))
    if valid and valid[0].fits:
        print("\nrow 1, the best fitting split (--command N prints row N's):")
        print(f"  {shlex.join(train_command(run, args.overrides, valid[0].dims))}")
    elif valid:
        print(f"\nno split fits in {run.cluster.gpu_memory_gb:g} GB per GPU; --command N prints row N's command")
    if invalid:
        print("\ncannot run (first reasons):")
        for p in invalid[:8]:
            d = p.dims
            print(f"  dp{d.dp} ep{d.ep} tp{d.tp} pp{d.pp}: {p.problem}")
    if args.png:
        _png(valid, args.png, args.top)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
