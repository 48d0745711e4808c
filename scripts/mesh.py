"""Print every rank's mesh coordinates and each group's members for a layout.

    python scripts/mesh.py parallel=ep2_dp4
    python scripts/mesh.py parallel=ep2_dp4 --dot mesh.dot   # Graphviz: dot -Tpng mesh.dot -o mesh.png

Pure arithmetic (parallel.dims): no process is started. The groups printed are
the ones parallel.mesh builds with init_device_mesh (a test checks they agree).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: moemesh without pip install

from moemesh.config.cli import compose_run, refuse  # noqa: E402
from moemesh.config.validate import validate_run  # noqa: E402
from moemesh.errors import ConfigError  # noqa: E402
from moemesh.parallel.dims import MeshAxis, ParallelDims  # noqa: E402
from scripts._args import Parser  # noqa: E402  (errors on one line)

GROUPS = {
    "ep": ((MeshAxis.EP,), "All-to-All of routed tokens"),
    "dp": ((MeshAxis.DP,), "all-reduce of expert gradients"),
    "data": ((MeshAxis.DP, MeshAxis.EP), "all-reduce of non-expert gradients; distinct data per rank"),
    "tp": ((MeshAxis.TP,), "activations inside attention / dense MLP"),
    "pp": ((MeshAxis.PP,), "activations between pipeline stages"),
}


def layer_span(chunks: list[range] | None) -> str:
    """The layers a pipeline rank holds, stage by stage in the order it runs them: "2..3" (one
    stage), "0,2" (interleaved), "0..1,6..7" (a V's rank 0); "all" without PP."""
    if not chunks:
        return "all"
    return ",".join(f"{c.start}..{c.stop - 1}" if len(c) > 1 else str(c.start) for c in chunks)


def describe(dims: ParallelDims, num_experts: int, stages: list[list[range]] | None = None) -> str:
    """``stages``: per pipeline rank, the layer ranges of its stages (``Placement.chunks``)."""
    lines = [f"mesh {dims.describe()}  (axes outermost first: pp, dp, ep, tp)", ""]
    e = num_experts // dims.ep
    lines.append(f"{'rank':>4}  {'pp':>2} {'dp':>2} {'ep':>2} {'tp':>2}  data_rank  experts  layers")
    for r in range(dims.world_size):
        c = dims.coords(r)
        first = c[MeshAxis.EP] * e
        span = layer_span(stages[c[MeshAxis.PP]] if stages else None)
        lines.append(
            f"{r:>4}  {c[MeshAxis.PP]:>2} {c[MeshAxis.DP]:>2} {c[MeshAxis.EP]:>2} {c[MeshAxis.TP]:>2}  "
            f"{dims.data_rank(r):>9}  {first}..{first + e - 1}  {span}"
        )
    lines.append("")
    for name, (axes, what) in GROUPS.items():
        groups = dims.groups(axes)
        lines.append(f"{name} groups ({len(groups)} x {len(groups[0])} ranks) — {what}:")
        lines.append("  " + " ".join("{" + ",".join(map(str, g)) + "}" for g in groups))
    return "\n".join(lines)


def to_dot(dims: ParallelDims, num_experts: int) -> str:
    """Ranks as nodes, one cluster per EP group, dashed edges between DP peers."""
    e = num_experts // dims.ep
    out = [
        "graph mesh {",
        '  rankdir=LR; node [shape=box, fontname="Helvetica"];',
        f'  label="{dims.describe()}: boxes = EP groups (All-to-All), dashed = DP peers (expert all-reduce)";',
    ]
    for i, group in enumerate(dims.groups(MeshAxis.EP)):
        c0 = dims.coords(group[0])
        out.append(f"  subgraph cluster_ep{i} {{")
        out.append(
            f'    label="EP group {i} (pp{c0[MeshAxis.PP]} dp{c0[MeshAxis.DP]} tp{c0[MeshAxis.TP]})"; style=rounded;'
        )
        for r in group:
            first = dims.coords(r)[MeshAxis.EP] * e
            out.append(f'    r{r} [label="rank {r}\\nexperts {first}-{first + e - 1}"];')
        out.append("  }")
    for group in dims.groups(MeshAxis.DP):
        for a, b in zip(group, group[1:]):
            out.append(f"  r{a} -- r{b} [style=dashed];")
    out.append("}")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dot", metavar="FILE", help="also write a Graphviz drawing of the mesh")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel=ep2_dp4")
    args = parser.parse_args(argv)
    try:
        run = compose_run(args.overrides)
        # The checks train.py makes: a layout it would refuse is refused here, in its words.
        dims = validate_run(run)
        from moemesh.parallel.pipeline import Placement

        # The stages each pipeline rank runs, as the trainer places them (interleaved: rank r holds
        # stages r, r + pp, ...; a V: r and 2 pp - 1 - r), not a contiguous run of layers.
        placement = Placement.of(run.parallel)
        stages = [placement.chunks(run.model.num_layers, r) for r in range(dims.pp)]
    except ConfigError as err:
        refuse(err)
    print(describe(dims, run.model.num_experts, stages))
    if args.dot is not None:
        dot = Path(args.dot)
        if not args.dot.strip() or (dot.exists() and not dot.is_file()):  # a FIFO: open() would block
            refuse(f"--dot {args.dot!r}: not a file it can write; give a new or regular file's path")
        try:
            with open(args.dot, "w") as f:
                f.write(to_dot(dims, run.model.num_experts))
        except OSError as err:
            refuse(f"--dot {args.dot}: cannot write it: {err.strerror or err}")
        print(f"\nwrote {args.dot}")


if __name__ == "__main__":
    main()
