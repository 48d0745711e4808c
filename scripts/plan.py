"""Plan before spending GPU hours: every valid DP x EP x TP x PP split, with what it costs.

    python scripts/plan.py model=seed_4096 cluster.gpus=16
    python scripts/plan.py model=seed_4096 cluster.gpus=16 parallel.sharding=zero3 trainer.activation_checkpointing=full
    python scripts/plan.py model=seed_4096 cluster.gpus=16 cluster.gpus_per_node=4 cluster.inter_node_gbps=25
    python scripts/plan.py model=seed_4096 cluster.gpus=1024 model.num_experts=256 trainer.global_batch_size=4096 \\
        --top 20 --png plan.png
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

Per GPU (of the pipeline stage that needs the most memory): parameters, gradients, AdamW
state, transient buffers and activations, each as moemesh/planning/memory.py's docstring states them; the
state is exact (a test builds the real model on the meta device for every preset and
mode, shards it as training does and compares each rank's local bytes), the rest an
estimate whose parts are named there.

Then All-to-All bytes per step, the bytes each rank moves over the data (dp x ep) and the
expert-data (dp x tp) groups for weights and gradients, and the pipeline bubble. Step time
comes from a simple model, stated here so it can be argued with:

  compute   = the stage's training FLOPs per GPU / (peak FLOP/s x --mfu), stretched by
            1/(1 - bubble) (a stage's FLOPs: its blocks', and the head's on the last stage;
            the stage whose step is longest prices the plan, its traffic is the plan's);
            activation checkpointing adds the recomputed forward's FLOPs (recompute_flops_per_token):
            full recomputes every block's forward (about 1/3 more: forward is 2 of the 6 x
            params FLOPs), selective all but the attention core and the expert matmuls; both
            stop before a block's last product whose output nothing saves (a dense FFN's w2,
            an ungated shared expert's w2 unless it hides an All-to-All)
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
  TP: per dense layer 4 all-reduces of the activations (2 forward, 2 backward); per MoE
            layer 2 for attention, 2 all-gathers of the routed tokens' slices (1 forward, 1
            backward) and 2 all-reduces more with a shared expert;
  PP: each micro-batch sends its activations forward and their gradients back,
            T x D per stage boundary each way (point to point, over the pp axis's link);
  step      = compute + All-to-All + TP + PP + weights and gradients: no overlap assumed.
            FSDP2 prefetches all-gathers and runs reduce-scatters beside the backward, so a
            real sharded step lies between compute alone and this sum.

The constants (peak x --mfu, one bandwidth per link class, one latency) are guesses for your
hardware. ``cluster=calibrated/<name>`` replaces them with constants fitted to measured runs
(``scripts/calibrate.py`` on a layout sweep, ``python train.py -m hydra/sweeper=layouts``, or on
``scripts/bench_comm.py``): the achieved FLOP/s (the routed experts' and the attention core's
apart, from runs that time them: time.experts, time.attention_core), GB/s and latency per collective kind (a2a;
sync, the gradients' all-reduce or reduce-scatter; gather, zero2/zero3's weight all-gathers; tp;
p2p) and link class (intra, inter), the share of the pipeline bubble that costs time (1 on
devices that idle in it), plus two terms a measured step has and the GPU model leaves out, the
optimizer (s per GB of state) and a fixed per-step overhead. The line under the plan's first
says which constants it used.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: moemesh without pip install

from moemesh.config.cli import compose_run, refuse  # noqa: E402
from moemesh.errors import ConfigError  # noqa: E402
from moemesh.moe.param_count import count_params  # noqa: E402
from moemesh.planning.calibration import PlannerOptions, constants_line  # noqa: E402
from moemesh.planning.cost import SEED_SPLITS, Plan, compute_bytes, make_plan, train_command  # noqa: E402
from scripts._args import Parser  # noqa: E402  (errors on one line)

# The planner options that became config keys: each old flag fails, naming its key.
GONE_FLAGS = {
    "--zero1": "parallel.sharding=zero2 (gradients and optimizer state sharded) or parallel.sharding=zero3",
    "--activation-checkpointing": "trainer.activation_checkpointing=full or trainer.activation_checkpointing=selective",
    "--precision": "trainer.dtype=fp32 or trainer.dtype=bf16 (auto: bf16 on the GPU)",
}


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


def gone_flag(argv: list[str]) -> str | None:
    """The one-line error for a planner flag that became a config key, or None."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in GONE_FLAGS:
            return f"moemesh: {flag} is gone: the planner reads the training config's keys; use {GONE_FLAGS[flag]}"
    return None


def _write_png(valid: list[Plan], path: str, top: int) -> None:
    try:
        _png(valid, path, top)
    except OSError as err:
        print(f"moemesh: --png {path}: cannot write it: {err.strerror or err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path}")


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
    fig.savefig(path, dpi=110, format="png")


def _end_if_nothing_runs(valid: list, invalid: list, gpus: int) -> None:
    """No split can run: one line naming the commonest reason, exit 1 (a script that plans sees it).
    Reasons are counted by the key their message starts with (each split's numbers differ: every
    ``trainer.global_batch_size=16 must be divisible by ...`` names its own), one shown as example."""
    if valid:
        return
    from collections import Counter

    if not invalid:
        print(f"moemesh: no split of {gpus} GPUs can run this config (no split considered)", file=sys.stderr)
        raise SystemExit(1)
    kinds = Counter(_reason_kind(p.problem) for p in invalid)
    kind, n = kinds.most_common(1)[0]
    example = next(p.problem for p in invalid if _reason_kind(p.problem) == kind)
    print(
        f"moemesh: no split of {gpus} GPUs can run this config ({n} of {len(invalid)} on {kind}, e.g. {example})",
        file=sys.stderr,
    )
    raise SystemExit(1)


def _reason_kind(problem: str) -> str:
    """What a split's problem is about: the key its message starts with (``model.num_kv_heads=8 must
    be ...``: model.num_kv_heads)."""
    return re.split(r"[=\s:]", problem, maxsplit=1)[0] or problem


def _params(n: int) -> str:
    """A parameter count as people say it: 46.70B, 1.35M, 12.3K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, PlannerOptions]:
    """The command line, and the planner's priors from it; exit 2 in one line for a gone flag or
    a prior that prices no step."""
    gone = gone_flag(argv)
    if gone:
        print(gone, file=sys.stderr)
        raise SystemExit(2)
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=seed_4096 cluster.gpus=16")
    ap.add_argument(
        "--mfu", type=float, default=PlannerOptions.mfu, help="model FLOP utilisation assumed for compute, in (0, 1]"
    )
    ap.add_argument(
        "--peak-flops", type=float, default=PlannerOptions.peak_flops, help="per GPU, when cluster.peak_flops is unset"
    )
    ap.add_argument("--top", type=int, default=25, help="rows shown (0: all); the seed's scenarios always are")
    ap.add_argument("--command", type=int, metavar="N", help="print only row N's train.py command")
    ap.add_argument("--png", metavar="FILE", help="a bar chart of the rows shown, to FILE (ending in .png)")
    args = ap.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    if args.png is not None and not args.png.lower().endswith(".png"):  # matplotlib would add or guess one
        print(f"moemesh: --png {args.png}: name a .png file, e.g. --png plan.png", file=sys.stderr)
        raise SystemExit(2)
    try:
        return args, PlannerOptions(mfu=args.mfu, peak_flops=args.peak_flops)
    except ValueError as err:
        print(f"moemesh: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None) -> None:
    args, options = _arguments(sys.argv[1:] if argv is None else list(argv))
    try:
        run = compose_run(args.overrides)
    except ConfigError as err:
        refuse(err)
    gpus = run.cluster.gpus
    if not gpus or gpus < 1:
        refuse("cluster.gpus must be set to a positive count, e.g. cluster.gpus=16")
    t0 = time.perf_counter()
    try:
        valid, invalid = make_plan(run, gpus, options)
    except ConfigError as err:  # more GPUs than the planner splits (cost.MAX_GPUS)
        refuse(err)
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
        f"plan: model={m.name} ({_params(count_params(m).total)} params, {m.num_experts} experts top-{m.top_k}), "
        f"{gpus} GPUs ({run.cluster.gpus_per_node}/node, {run.cluster.gpu_memory_gb:g} GB), "
        f"NVLink {run.cluster.intra_node_gbps:g} GB/s, network {run.cluster.inter_node_gbps:g} GB/s, "
        f"compute {'bf16' if compute_bytes(run) == 2 else 'fp32'} (trainer.dtype={run.trainer.dtype}), "
        f"parallel.sharding={run.parallel.sharding}, "
        f"trainer.activation_checkpointing={run.trainer.activation_checkpointing}, "
        f"trainer.global_batch_size={run.trainer.global_batch_size} x trainer.seq_len={run.trainer.seq_len} tokens"
    )
    print(constants_line(run.cluster, options))
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
    _end_if_nothing_runs(valid, invalid, gpus)
    if args.png:
        _write_png(valid, args.png, args.top)


if __name__ == "__main__":
    main()
