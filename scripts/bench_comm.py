"""Collective micro-benchmark: bandwidth and latency of what the planner costs, per group shape and link.

    python scripts/bench_comm.py --world 4 [--sizes 16K,256K,1M,4M] [--iters 10] [--out comm.json]
    python scripts/calibrate.py --calibrate-from comm.json --name cpu4-bench       # the planner's comm constants

    # across nodes: every rank started by a launcher (torchrun on each node, or srun); --world is its world
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=2 --master_addr=n1 --master_port=29500 \
        scripts/bench_comm.py --out comm2x2.json                                    # (node_rank=1 on n2)

Spawns ``--world`` ranks on this machine (gloo on CPU, nccl with one GPU per rank), or joins the
launcher that started it (RANK, WORLD_SIZE, MASTER_ADDR set: rank 0 hosts the store on MASTER_ADDR's
address, ``moemesh.launch.store``), and times, for every group shape of that world, every group of
the shape at once (as training runs them):

* ``a2a``: the dispatcher's All-to-All of rows (``moemesh.parallel.comm.exchange_rows``: torch's
  ``all_to_all_single``, or on gloo its receives posted before its sends) with uneven splits (rank
  r sends (1 + (r + j) mod n) parts to peer j);
* ``a2a_torch`` (only when asked for): torch's ``all_to_all_single`` on the same buffers, the
  reference for ``a2a`` in the same run; left out of the planner's constants;
* ``all_reduce``, ``reduce_scatter``, ``all_gather`` (a collective the backend lacks is skipped, said so);
* ``p2p``: a send and its receive between the two ranks of a pair (one way: half a round trip).

Group shapes: for each divisor n > 1 of the world, groups of n consecutive ranks (the innermost
mesh axes, tp and ep) and, when n < world, of n strided ranks (dp). Each time is the slowest
rank's, the median over ``--repeats`` of ``--iters`` back-to-back calls. Per collective and shape,
``t = bytes' / bandwidth + steps x latency`` is fitted over the sizes, with the planner's bytes' and
steps, taken from the planner itself (``moemesh.planning.calibration.collective``; each result
records the bytes that left the timed rank as ``sent``). ``--out`` keeps the times and fits as
JSON for ``scripts/calibrate.py``.

Link classes. Each result carries the link its groups use: ``intra`` when every group of the shape
lies inside one host (by the ranks' host names), ``inter`` when every group spans hosts (``mixed``
otherwise, left out of the planner's constants). ``calibration.constants_from_bench`` fits
``<kind>_intra`` and ``<kind>_inter`` apart, as ``cost.py`` prices a group by whether it crosses
nodes. For a shape whose groups hold one rank per host (every byte a rank sends leaves its host),
the table also gives the host's link rate: a rank's fitted bandwidth times the host's ranks
sending at once (not for p2p, whose ping-pong pairs need not send in the same direction at
once). That is the
number to hold against a link's nominal rate (e.g. a ``tc tbf`` shaping, ``.ci/multinode/up.sh``).

A 2-core CPU under gloo measures its memory copies and loopback TCP stack, not a network;
numbers from this machine do not transfer to NVLink or InfiniBand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: moemesh without pip install

from moemesh.planning.calibration import bench_row_terms, fit_link  # noqa: E402
from scripts._args import Parser, positive_int  # noqa: E402  (errors on one line)

KINDS = ("a2a", "all_reduce", "reduce_scatter", "all_gather", "p2p")  # the default --kinds
REFERENCES = {"a2a_torch": "a2a"}  # timed only when asked for; priced as the kind they stand beside


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * scale)


def group_shapes(world: int) -> dict[str, list[list[int]]]:
    """{"consecutive2": [[0, 1], [2, 3]], "strided2": [[0, 2], [1, 3]], "consecutive4": [[0, 1, 2, 3]]}."""
    shapes = {}
    for n in range(2, world + 1):
        if world % n:
            continue
        shapes[f"consecutive{n}"] = [list(range(g * n, (g + 1) * n)) for g in range(world // n)]
        if n < world:
            stride = world // n
            shapes[f"strided{n}"] = [list(range(s, world, stride)) for s in range(stride)]
    return shapes


def _splits(rank: int, n: int, numel: int) -> list[int]:
    """Uneven, symmetric splits (what r sends j equals what j sends r), summing to ``numel``."""
    weights = [1 + (rank + j) % n for j in range(n)]
    unit = numel // sum(weights)
    return [w * unit for w in weights]


def _make_op(kind: str, pg, members: list[int], me: int, numel: int, device):
    """One call of ``kind`` on this rank's group, its buffers allocated once."""
    import torch
    import torch.distributed as dist

    from moemesh.parallel.comm import exchange_rows

    n = len(members)
    if kind in ("a2a", "a2a_torch"):
        splits = _splits(me, n, numel)
        x = torch.ones(sum(splits), device=device)
        y = torch.empty_like(x)
        if kind == "a2a_torch":
            return lambda: dist.all_to_all_single(y, x, splits, splits, group=pg)
        return lambda: exchange_rows(y, x, splits, splits, pg)
    if kind == "all_reduce":
        x = torch.ones(numel, device=device)
        return lambda: dist.all_reduce(x, group=pg)
    if kind == "reduce_scatter":
        x, y = torch.ones(numel // n * n, device=device), torch.empty(numel // n, device=device)
        return lambda: dist.reduce_scatter_tensor(y, x, group=pg)
    if kind == "all_gather":
        x, y = torch.ones(numel // n, device=device), torch.empty(numel // n * n, device=device)
        return lambda: dist.all_gather_into_tensor(y, x, group=pg)
    x, peer = torch.ones(numel, device=device), members[1 - me]

    def ping_pong():  # one way is half of it
        if me == 0:
            dist.send(x, peer, group=pg)
            dist.recv(x, peer, group=pg)
        else:
            dist.recv(x, peer, group=pg)
            dist.send(x, peer, group=pg)

    return ping_pong


def link_of(groups: list[list[int]], hosts: list[str]) -> str:
    """intra: every group inside one host; inter: every group spans hosts; mixed otherwise."""
    spans = {len({hosts[r] for r in g}) > 1 for g in groups}
    return "mixed" if len(spans) > 1 else ("inter" if spans.pop() else "intra")


def ranks_sending_across(groups: list[list[int]], hosts: list[str]) -> int:
    """For groups of one rank per host (every byte a rank sends leaves its host): how many of a
    host's ranks send at once, each over its host's link; 0 for other shapes."""
    if any(len({hosts[r] for r in g}) != len(g) for g in groups):
        return 0
    return max(hosts.count(h) for h in set(hosts))


def _join(rank: int, world: int, store: str | None, device, cuda: bool) -> None:
    """Spawned ranks meet through a file; launched ones through MASTER_ADDR (rank 0 hosts the
    store on that address only, unless torchrun's agent hosts it)."""
    import torch.distributed as dist

    backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(seconds=300)
    if store is not None:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout)
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        return
    from moemesh.launch.store import job_store

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    tcp = job_store(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0,
        timeout_s=300,
        spans_nodes=local < world,
    )
    dist.init_process_group(backend, store=tcp, rank=rank, world_size=world, timeout=timeout)


def _rank(
    rank: int,
    world: int,
    store: str | None,
    sizes: list[int],
    iters: int,
    repeats: int,
    out: str,
    kinds=KINDS,
    leave=True,
) -> None:
    import socket
    import warnings

    import torch
    import torch.distributed as dist

    # torch 2.13 renames reduce_scatter_tensor / all_gather_into_tensor (*_single); the old names still work.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if store is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # spawned: one machine
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    _join(rank, world, store, device, cuda)
    hosts: list = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    from moemesh.parallel.comm import set_rank_hosts

    set_rank_hosts(hosts)  # as build_mesh does: a2a's groups across hosts post their receives first
    results, skipped = [], {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for shape, groups in group_shapes(world).items():
        handles = [dist.new_group(g) for g in groups]  # every rank creates every group, in order
        mine = next(i for i, g in enumerate(groups) if rank in g)
        pg, members = handles[mine], groups[mine]
        n, me = len(members), members.index(rank)
        link, across = link_of(groups, hosts), ranks_sending_across(groups, hosts)
        for kind in kinds:
            if kind == "p2p" and n != 2:
                continue
            for nbytes in sizes:
                numel = nbytes // 4
                try:
                    op = _make_op(kind, pg, members, me, numel, device)
                    op()  # warm-up (and: does the backend have it?)
                    sync()
                    ok = torch.ones(1, device=device)
                except (RuntimeError, NotImplementedError, ValueError) as err:
                    ok = torch.zeros(1, device=device)
                    skipped[kind] = str(err).strip().splitlines()[0][:120]
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips together
                if ok.item() == 0:
                    break
                times = []
                for _ in range(repeats):
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        op()
                    sync()
                    t = torch.tensor([(time.perf_counter() - t0) / iters], device=device)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's
                    times.append(t.item() / (2 if kind == "p2p" else 1))
                results.append(
                    {
                        "kind": kind,
                        "shape": shape,
                        "n": n,
                        "bytes": nbytes,
                        "sent": sent_bytes(kind, nbytes, n),
                        "s": statistics.median(times),
                        "link": link,
                        "ranks_sending_across": across,
                    }
                )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {"results": results, "skipped": skipped, "backend": "nccl" if cuda else "gloo", "hosts": hosts}, f
            )
    dist.destroy_process_group()
    sys.stdout.flush()
    if leave or rank != 0:  # rank 0 of a launched job returns to report
        os._exit(0)  # as moemesh's ranks leave: no interpreter teardown after the group is gone


def sent_bytes(kind: str, nbytes: int, n: int) -> int:
    """The bytes that leave the timed rank (0) in one collective of an ``nbytes`` buffer: an
    All-to-All keeps its own split; every other collective's buffer is the planner's ``nbytes``."""
    return nbytes - _splits(0, n, nbytes // 4)[0] * 4 if REFERENCES.get(kind, kind) == "a2a" else nbytes


def fits(results: list[dict]) -> list[dict]:
    """Per (kind, shape): GB/s and latency from the planner's bytes' and steps over the sizes; its
    link class, and for one-rank-per-host shapes the host's link rate (``link_gbps``)."""
    out = []
    keys = sorted({(r["kind"], r["shape"], r["n"]) for r in results})
    for kind, shape, n in keys:
        rows = [r for r in results if (r["kind"], r["shape"]) == (kind, shape)]
        if len(rows) < 2:
            continue
        priced = [bench_row_terms({**r, "kind": REFERENCES.get(kind, kind)}) for r in rows]
        gbps, lat = fit_link(priced, [r["s"] for r in rows])
        fit = {
            "kind": kind,
            "shape": shape,
            "n": n,
            "gbps": gbps,
            "latency_us": lat,
            "link": rows[0].get("link", "intra"),
        }
        if rows[0].get("ranks_sending_across") and kind != "p2p":  # a ping-pong's pairs alternate directions
            fit["link_gbps"] = gbps * rows[0]["ranks_sending_across"]
        out.append(fit)
    return out


def table(data: dict) -> str:
    sizes = sorted({r["bytes"] for r in data["results"]})
    head = "| collective | group | link | " + " | ".join(f"{s / 2**10:,.0f} KiB µs" for s in sizes)
    lines = [head + " | fitted GB/s | fitted latency µs | host link GB/s |", "|" + "---|" * (len(sizes) + 6)]
    by = {(r["kind"], r["shape"], r["bytes"]): r["s"] for r in data["results"]}
    for f in data["fits"]:
        cells = [by.get((f["kind"], f["shape"], s)) for s in sizes]
        shown = " | ".join("-" if c is None else f"{c * 1e6:,.0f}" for c in cells)
        host_link = f"{f['link_gbps']:.3g}" if "link_gbps" in f else "-"
        lines.append(
            f"| {f['kind']} | {f['shape']} | {f.get('link', 'intra')} | {shown} | {f['gbps']:.3g} | "
            f"{f['latency_us']:.3g} | {host_link} |"
        )
    for kind, why in data.get("skipped", {}).items():
        lines.append(f"\n{kind}: skipped, the backend refused it: {why}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--world", type=positive_int, default=4, help="ranks to spawn on this machine (under a launcher: its)"
    )
    ap.add_argument("--sizes", default="16K,256K,1M,4M", help="message sizes in bytes (K, M, G suffixes)")
    ap.add_argument("--iters", type=positive_int, default=10, help="back-to-back calls per timing")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timings per size (the median is kept)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="the collectives to time (default: all)")
    ap.add_argument("--out", help="write the times and fits as JSON (for scripts/calibrate.py --calibrate-from)")
    a = ap.parse_args(argv)
    if a.world < 2:
        ap.error("--world must be at least 2")
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    kinds = tuple(a.kinds.split(","))
    if not set(kinds) <= set(KINDS) | set(REFERENCES):
        ap.error(f"--kinds {a.kinds}: valid: {','.join((*KINDS, *REFERENCES))}")
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if launched and int(os.environ["RANK"]) != 0:  # writes no results and leaves by os._exit: no directory
        _rank(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, sizes, a.iters, a.repeats, os.devnull, kinds
        )
    with tempfile.TemporaryDirectory(prefix="moemesh-bench-comm-") as tmp:
        raw = os.path.join(tmp, "raw.json")
        if launched:  # one rank of a launched job: this process; rank 0 goes on to report
            world = int(os.environ["WORLD_SIZE"])
            _rank(int(os.environ["RANK"]), world, None, sizes, a.iters, a.repeats, raw, kinds, leave=False)
        else:
            import torch.multiprocessing as mp

            world = a.world
            args = (world, os.path.join(tmp, "store"), sizes, a.iters, a.repeats, raw, kinds)
            mp.start_processes(_rank, args=args, nprocs=world, start_method="spawn")
        with open(raw) as f:
            data = json.load(f)
    data["fits"] = fits(data["results"])
    data["world"] = world
    print(table(data))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
