"""Plan before spending GPU hours: every valid DP x EP x TP x PP split, with what it costs.

    python scripts/plan.py model=seed_4096 cluster.gpus=16
    python scripts/plan.py model=seed_4096 cluster.gpus=16 cluster.gpus_per_node=4 cluster.inter_node_gbps=25
    python scripts/plan.py model=seed_4096 cluster.gpus=1024 model.num_experts=256 --top 20 --png plan.png
    python scripts/plan.py model=seed_4096 cluster.gpus=16 --command 3   # row 3's train.py command

The table shows the first --top rows (0: all) and, wherever they rank, the seed's two
scenarios (dp8 x ep2 and dp2 x ep8 of 16 GPUs); a line under it says how many rows were
left out. "total GB" is what "fits" compares with cluster.gpu_memory_gb: parameters +
gradients + optimizer state + activations, per GPU. Under the table: the train.py command
for the best fitting split; --command N prints row N's alone. The command names the split
(parallel.name, e.g. pp2_dp8, in the presets' naming) and sets its four degrees on top of
the same overrides, so it composes without a preset for that split.

Per GPU (the busiest pipeline stage): parameter, gradient and optimizer bytes split
into expert / non-expert (exact: a test builds the real model on the meta device for
every preset), activations with and without activation checkpointing (an estimate,
below), All-to-All bytes per step, gradient all-reduce bytes for the data (dp x ep) and
expert-data (dp x tp) groups, and the pipeline bubble. Step time comes from a simple
model, stated here so it can be argued with:

  compute   = training FLOPs per GPU / (peak FLOP/s x --mfu), stretched by 1/(1 - bubble)
  a collective of B bytes over n ranks costs  alpha x steps + B' / bandwidth,
            B' = 2 (n-1)/n B for a ring all-reduce (steps = 2 (n-1)), and for an
            All-to-All the bytes this rank sends (steps = n - 1);
  bandwidth = cluster.intra_node_gbps if the group's ranks share a node under the mesh's
            rank order (tp innermost, then ep, dp, pp), else cluster.inter_node_gbps;
  TP: 4 all-reduces of the activations per layer (2 forward, 2 backward);
  PP: each micro-batch sends its activations forward and their gradients back,
            T x D per stage boundary each way (point to point, over the pp axis's link);
  step      = compute + All-to-All + TP + gradient all-reduce  (no overlap assumed).

Activations per GPU, per micro-batch in flight, in elements of the activation dtype
(Megatron's 34 s b h bytes at 2 bytes per element; the 5 a s^2 b attention-score term is
left out because scaled_dot_product_attention's flash kernels do not store the scores):
  attention + norms  ~ T x D x 17 / tp
  dense FFN          ~ T x (D + 3 F) / tp
  MoE                ~ T x K x (2 D + 3 F_e) + T x E (router)
with checkpointing only each layer's input, T x D, is kept. 1F1B holds pp micro-batches
in flight on the first stage; GPipe holds all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shlex
import sys
import time
from dataclasses import dataclass

from _config import compose_run

from moemesh.config.schema import RunConfig
from moemesh.config.validate import grad_accum_steps, micro_batch_size, validate_run
from moemesh.errors import ConfigError
from moemesh.moe.param_count import count_params, model_flops_per_token
from moemesh.parallel.dims import MESH_AXES, MeshAxis, ParallelDims, layout_name
from moemesh.parallel.pipeline import stage_layers

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# The seed's two scenarios for 16 GPUs (presets ep2_dp8, ep8_dp2): always shown when valid.
SEED_SPLITS = (ParallelDims(dp=8, ep=2), ParallelDims(dp=2, ep=8))
# Bytes per parameter: (weights, gradients, optimizer state), by training precision.
PRECISIONS = {
    "fp32": (4, 4, 8),  # what moemesh trains on CPU: fp32 weights, grads, Adam m and v
    "bf16_mixed": (2, 2, 12),  # bf16 weights and grads, fp32 master copy + Adam m and v
}


@dataclass
class Plan:
    dims: ParallelDims
    problem: str | None = None  # why the split is invalid
    param_expert: int = 0
    param_non_expert: int = 0
    grad_bytes: int = 0
    optim_bytes: int = 0
    act_bytes: int = 0
    act_ckpt_bytes: int = 0
    a2a_bytes: int = 0
    ar_data_bytes: int = 0
    ar_expert_bytes: int = 0
    bubble: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    crosses: str = ""
    total_bytes: int = 0  # memory + the activations planned (checkpointed or not): what `fits` compares
    fits: bool = True

    @property
    def memory(self) -> int:
        return self.param_expert + self.param_non_expert + self.grad_bytes + self.optim_bytes

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s


def splits(gpus: int):
    """Every (dp, ep, tp, pp) whose product is ``gpus``."""
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    for pp in divisors:
        for tp in divisors:
            for ep in divisors:
                rest, rem = divmod(gpus, pp * tp * ep)
                if rem == 0 and rest >= 1:
                    yield ParallelDims(dp=rest, ep=ep, tp=tp, pp=pp)


def param_tensors(cfg, dims: ParallelDims, stage: int) -> int:
    """Parameter tensors on one rank of ``stage`` (AdamW keeps a 4-byte step counter for each)."""
    layers = stage_layers(cfg.num_layers, dims.pp)[stage]
    n = 0
    for l in layers:
        n += 4 + 2  # q, k, v, o; two norms
        if (l + 1) % cfg.moe_every_k_layers == 0:
            n += 1 + 3 + (3 if cfg.shared_expert_ffn_size else 0)
        else:
            n += 3
    return n + (1 if layers.start == 0 else 0) + (2 if layers.stop == cfg.num_layers else 0)


def a2a_bytes(
    tokens: int, top_k: int, hidden: int, dtype_bytes: int, ep: int, moe_layers: int = 1, micro_steps: int = 1
) -> int:
    """Bytes one rank sends through the All-to-All per step, under uniform routing:
    (ep-1)/ep of its T*K pairs leave (dispatch forward, combine backward) and as many
    arrive and go back (combine forward, dispatch backward)."""
    return int(4 * tokens * top_k * (ep - 1) / ep * hidden * dtype_bytes * moe_layers * micro_steps)


def _crosses(dims: ParallelDims, axes, gpus_per_node: int) -> bool:
    """Whether the group along ``axes`` that holds rank 0 spans nodes (groups are translates
    of each other under the rank order, so one answers for all)."""
    ranges = [range(dims.size(a)) if a in axes else range(1) for a in MESH_AXES]
    group = [dims.rank_of(dict(zip(MESH_AXES, c, strict=True))) for c in itertools.product(*ranges)]
    return len({r // gpus_per_node for r in group}) > 1


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
    w_b, g_b, o_b = PRECISIONS[args.precision]
    act_b = DTYPE_BYTES["bf16" if args.precision == "bf16_mixed" else "fp32"]
    # The busiest stage: the one with the most parameters.
    stage = max(range(dims.pp), key=lambda s: count_params(m, dims, stage=s).total)
    pc = count_params(m, dims, stage=stage)
    p.param_expert, p.param_non_expert = pc.expert * w_b, pc.non_expert * w_b
    p.grad_bytes = pc.total * g_b
    n_data, n_exp = dims.dp * dims.ep, dims.dp * dims.tp
    if args.zero1:  # what-if: optimizer state sharded over the ranks that hold the same weights
        p.optim_bytes = pc.non_expert * o_b // n_data + pc.expert * o_b // n_exp
    else:
        p.optim_bytes = pc.total * o_b + 4 * param_tensors(m, dims, stage)
    layers = stage_layers(m.num_layers, dims.pp)[stage]
    moe = sum(1 for l in layers if (l + 1) % m.moe_every_k_layers == 0)
    micro, accum = micro_batch_size(candidate), grad_accum_steps(candidate)
    T = micro * t.seq_len  # tokens per micro-batch per data rank
    T_gpu = T // dims.tp  # TP peers route disjoint slices
    D, F, Fe, K, E = m.hidden_size, m.ffn_hidden_size, m.moe_ffn_hidden_size, m.top_k, m.num_experts
    per_layer_attn = T * D * 17 // dims.tp
    per_dense = T * (D + 3 * F) // dims.tp
    per_moe = T_gpu * K * (2 * D + 3 * Fe) + T_gpu * E
    in_flight = min(dims.pp, accum) if run.parallel.pipeline_schedule == "1f1b" else accum
    per_mb = len(layers) * per_layer_attn + (len(layers) - moe) * per_dense + moe * per_moe
    p.act_bytes = per_mb * act_b * in_flight
    p.act_ckpt_bytes = len(layers) * T * D * act_b * in_flight
    # All-to-All: rows leaving and arriving, uniform routing: (ep-1)/ep of the pairs are remote.
    p.a2a_bytes = a2a_bytes(T_gpu, K, D, act_b, dims.ep, moe, accum)
    p.ar_data_bytes = int(2 * (n_data - 1) / n_data * pc.non_expert * g_b) if n_data > 1 else 0
    p.ar_expert_bytes = int(2 * (n_exp - 1) / n_exp * pc.expert * g_b) if n_exp > 1 else 0
    p.bubble = (dims.pp - 1) / (accum + dims.pp - 1)
    # Compute: the model's training FLOPs spread evenly over the GPUs.
    flops = model_flops_per_token(m, t.seq_len) * t.global_batch_size * t.seq_len / dims.world_size
    peak = c.peak_flops or args.peak_flops
    p.compute_s = flops / (peak * args.mfu) / (1 - p.bubble)
    gpn = c.gpus_per_node

    def bw(axes):
        return (c.inter_node_gbps if _crosses(dims, axes, gpn) else c.intra_node_gbps) * 1e9

    alpha = c.latency_us * 1e-6
    comm = 0.0
    if dims.ep > 1:
        comm += p.a2a_bytes / bw((MeshAxis.EP,)) + alpha * (dims.ep - 1) * 4 * moe * accum
    if dims.tp > 1:
        tp_bytes = 4 * len(layers) * accum * 2 * (dims.tp - 1) / dims.tp * T * D * act_b
        comm += tp_bytes / bw((MeshAxis.TP,)) + alpha * 4 * len(layers) * accum * 2 * (dims.tp - 1)
    if dims.pp > 1:
        p2p_bytes = 2 * accum * T * D * act_b // (dims.tp if run.parallel.sequence_parallel else 1)
        comm += p2p_bytes / bw((MeshAxis.PP,)) + alpha * 2 * accum
    comm += p.ar_data_bytes / bw((MeshAxis.DP, MeshAxis.EP)) + (alpha * 2 * (n_data - 1) if n_data > 1 else 0)
    comm += p.ar_expert_bytes / bw((MeshAxis.DP, MeshAxis.TP)) + (alpha * 2 * (n_exp - 1) if n_exp > 1 else 0)
    p.comm_s = comm
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
    act = p.act_ckpt_bytes if args.activation_checkpointing else p.act_bytes
    p.total_bytes = p.memory + act
    p.fits = p.total_bytes <= c.gpu_memory_gb * 1e9
    return p


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


def table(valid: list[Plan], top: int, ckpt: bool) -> str:
    head = (
        "| # | dp | ep | tp | pp | fits | total GB | step s | compute s | comm s | bubble | expert GB | "
        "non-exp GB | grad GB | optim GB | act GB | All-to-All GB | AR data GB | AR expert GB | off-node groups |"
    )
    lines = [head, "|" + "---|" * 20]
    rows = shown_rows(valid, top)
    for i in rows:
        p = valid[i - 1]
        d = p.dims
        act = p.act_ckpt_bytes if ckpt else p.act_bytes
        mark = " (seed)" if d in SEED_SPLITS else ""
        lines.append(
            f"| {i}{mark} | {d.dp} | {d.ep} | {d.tp} | {d.pp} | {'yes' if p.fits else 'NO'} | {_gb(p.total_bytes)} | "
            f"{p.step_s:.3f} | {p.compute_s:.3f} | {p.comm_s:.3f} | {p.bubble:.0%} | {_gb(p.param_expert)} | "
            f"{_gb(p.param_non_expert)} | {_gb(p.grad_bytes)} | {_gb(p.optim_bytes)} | {_gb(act)} | "
            f"{_gb(p.a2a_bytes)} | {_gb(p.ar_data_bytes)} | {_gb(p.ar_expert_bytes)} | {p.crosses} |"
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


def what_ifs(args) -> str:
    """The planner options that training does not build, to say beside a command."""
    named = [
        n for n, on in (("--activation-checkpointing", args.activation_checkpointing), ("--zero1", args.zero1)) if on
    ]
    return (
        (
            f"  (planned with {' and '.join(named)}, which training does not build yet: a run's memory per GPU is "
            "higher than planned)"
        )
        if named
        else ""
    )


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=seed_4096 cluster.gpus=16")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16_mixed")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument(
        "--zero1",
        action="store_true",
        help="what-if: shard optimizer state over the data (and expert-data) group; not built in training",
    )
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
        if what_ifs(args):
            print(what_ifs(args).strip(), file=sys.stderr)
        return
    m = run.model
    print(
        f"plan: model={m.name} ({count_params(m).total / 1e9:.2f}B params, {m.num_experts} experts top-{m.top_k}), "
        f"{gpus} GPUs ({run.cluster.gpus_per_node}/node, {run.cluster.gpu_memory_gb:g} GB), "
        f"NVLink {run.cluster.intra_node_gbps:g} GB/s, network {run.cluster.inter_node_gbps:g} GB/s, "
        f"precision {args.precision}, activation checkpointing {'on' if args.activation_checkpointing else 'off'}"
        f"{', ZeRO-1 optimizer sharding (what-if)' if args.zero1 else ''}"
    )
    print(
        f"{len(valid)} valid splits ({sum(p.fits for p in valid)} fit in memory), {len(invalid)} do not divide; "
        f"planned in {time.perf_counter() - t0:.2f} s"
    )
    print(table(valid, args.top, args.activation_checkpointing))
    if valid and valid[0].fits:
        print("\nrow 1, the best fitting split (--command N prints row N's):")
        print(f"  {shlex.join(train_command(run, args.overrides, valid[0].dims))}")
        if what_ifs(args):
            print(what_ifs(args))
    elif valid:
        print(f"\nno split fits in {run.cluster.gpu_memory_gb:g} GB per GPU; --command N prints row N's command")
    if invalid:
        print("\ndo not divide (first reasons):")
        for p in invalid[:8]:
            d = p.dims
            print(f"  dp{d.dp} ep{d.ep} tp{d.tp} pp{d.pp}: {p.problem}")
    if args.png:
        _png(valid, args.png, args.top)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
