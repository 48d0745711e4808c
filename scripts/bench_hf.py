"""Benchmark: a sharded Hugging Face import on ep4, and an export, next to safetensors.torch.load_file.

    flock /tmp/moemesh-cpu.lock python scripts/bench_hf.py [--dir DIR] [--rounds 3] [--markdown]

1. Builds once (kept in --dir) a Mixtral-shaped model with random weights in bf16, at least 1 GB,
   saved by transformers' save_pretrained (one file, as save_pretrained writes up to 5 GB).
2. Spawns 4 gloo ranks laid out as ep4. Each resets its peak RSS (/proc/self/clear_refs), builds
   its part as training does (``trainer.parallelize.build_model``: meta device, EP applied,
   materialised, no init) and reads its boxes (``interop.hf.load.load_weights``). Reported per
   rank: the peak RSS above the baseline taken just before, against the bytes of the parameters
   the rank holds (fp32). The goal: at most 1.25x.
3. Timing: the import (all ranks together, the slowest rank's wall time) and, in the same rounds,
   ``safetensors.torch.load_file`` of the same file on one rank, as seconds per GB of the
   checkpoint. Then every rank saves its part as a moemesh checkpoint, and the parent exports it
   (``interop.hf.export``), rounds interleaved with load_file again. Page cache warm throughout
   (the file was just written or read): the numbers are CPU and memory work, not the disk.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts._args import Parser, positive_int  # noqa: E402  (errors on one line)

SHAPE = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=1792,
    num_hidden_layers=10,
    num_attention_heads=16,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
)
WORLD = 4


def _status(*keys: str) -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in keys:
            out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_checkpoint(d: Path) -> Path:
    """The benchmark's checkpoint, built once: random bf16 weights, saved by save_pretrained."""
    if (d / "config.json").exists() and (d / "model.safetensors").exists():
        return d
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mixtral", **SHAPE)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def _load_file_s(files: list[Path]) -> float:
    """safetensors.torch.load_file of every file, each tensor then copied to fp32 (as moemesh
    holds it): load_file alone maps the file and reads nothing until a tensor is touched."""
    import torch
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    for f in files:
        tensors = load_file(str(f))
        for t in tensors.values():
            t.to(torch.float32)
        del tensors
    return time.perf_counter() - t0


def _rank(rank: int, world: int, store: str, d: str, rounds: int, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=rank, world_size=world)
    import safetensors.torch  # noqa: F401  (code the load imports: the process's, not the load's, memory)
    import torch.distributed.tensor._utils  # noqa: F401

    from moemesh.config.cli import compose_run
    from moemesh.interop.hf.families import origin_meta
    from moemesh.interop.hf.load import load_weights
    from moemesh.parallel import checkpoint
    from moemesh.parallel.checkpoint_state import parameter_entries
    from moemesh.parallel.mesh import build_mesh
    from moemesh.trainer.parallelize import build_model

    run = compose_run(["model=hf", f"model.hf_path={d}", "parallel=ep4", "model.max_seq_len=128"])
    mesh = build_mesh(run.parallel.dims, "cpu")
    dist.barrier()
    _reset_peak()
    base = _status("VmRSS")["VmRSS"]
    model = build_model(run, mesh, torch.device("cpu"))
    first = load_weights(model, run.model, seed=0)
    peak = _status("VmHWM")["VmHWM"] - base
    files = sorted(Path(d).glob("*.safetensors"))
    timings: dict[str, list[float]] = {"import": [], "load_file": []}
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        load_weights(model, run.model, seed=0)
        slowest = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        timings["import"].append(float(slowest))
        if rank == 0:
            timings["load_file"].append(_load_file_s(files))
        dist.barrier()
    state = {f"model.{k}": v for k, v in parameter_entries(model).items()}
    state["trainer.step"] = torch.zeros((), dtype=torch.int64)
    meta = {
        "model": _asdict(run.model),
        "hf": origin_meta(run.model),
        "layout": "ep4",
        "dp": 1,
        "ep": 4,
        "tp": 1,
        "pp": 1,
    }
    saved = checkpoint.save(Path(out) / "checkpoints", 0, state, meta, rank=rank, keep=1)
    mine = {"rank": rank, "peak_above_baseline": peak, "own_bytes": first.own_bytes, "bytes_read": first.bytes_read}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        Path(out, "ranks.json").write_text(
            json.dumps({"ranks": everyone, "timings": timings, "checkpoint": str(saved)})
        )
    dist.barrier()
    dist.destroy_process_group()


def _asdict(cfg) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _ratio(xs: list[float], ref: list[float]) -> float:
    return statistics.median(xs) / statistics.median(ref)


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "moemesh-bench-hf"))
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    import torch.multiprocessing as mp

    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = build_checkpoint(root / "mixtral_bench")
    built = time.perf_counter() - t0
    files = sorted(src.glob("*.safetensors"))
    gb = sum(f.stat().st_size for f in files) / 1e9
    work = root / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    store = tempfile.mkdtemp(prefix="moemesh-bench-hf-")
    try:
        mp.start_processes(
            _rank, args=(WORLD, store, str(src), a.rounds, str(work)), nprocs=WORLD, start_method="spawn"
        )
    finally:
        shutil.rmtree(store, ignore_errors=True)
    res = json.loads((work / "ranks.json").read_text())
    from moemesh.interop.hf.export import export_checkpoint

    export_s, export_ref = [], []
    out_gb = 0.0
    for i in range(a.rounds):
        out = work / f"export{i}"
        t = time.perf_counter()
        stats = export_checkpoint(Path(res["checkpoint"]), out, dtype="bf16")
        export_s.append(time.perf_counter() - t)
        out_gb = stats.bytes_written / 1e9
        export_ref.append(_load_file_s(files))
        shutil.rmtree(out)
    report(a, res, gb, out_gb, export_s, export_ref, built)
    shutil.rmtree(work, ignore_errors=True)


def _cpu() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def report(a, res: dict, gb: float, out_gb: float, export_s, export_ref, built: float) -> None:
    import torch

    t = res["timings"]
    per_gb = lambda xs, n: [x / n for x in xs]  # noqa: E731
    lines = [
        f"{datetime.date.today()}, {os.cpu_count()}-core {_cpu()}, torch {torch.__version__}; "
        f"checkpoint: Mixtral-shaped, {SHAPE['num_hidden_layers']} layers x {SHAPE['num_local_experts']} experts, "
        f"hidden {SHAPE['hidden_size']}, bf16, {gb:.3f} GB in one file (built in {built:.0f} s); ep4, 4 gloo ranks",
        "",
        "| rank | own parameters (fp32) | read from the file | peak RSS above baseline | ratio |",
        "|---|---|---|---|---|",
    ]
    worst = 0.0
    for r in res["ranks"]:
        ratio = r["peak_above_baseline"] / r["own_bytes"]
        worst = max(worst, ratio)
        lines.append(
            f"| {r['rank']} | {r['own_bytes'] / 2**20:,.1f} MiB | {r['bytes_read'] / 2**20:,.1f} MiB | "
            f"{r['peak_above_baseline'] / 2**20:,.1f} MiB | {ratio:.3f}x |"
        )
    lines += [
        "",
        f"worst rank: {worst:.3f}x its own bytes (goal <= 1.25x)",
        "",
        "| seconds per GB of checkpoint (median, range of rounds) | moemesh | load_file + fp32 copy | ratio |",
        "|---|---|---|---|",
        f"| import on ep4, 4 ranks (the slowest) vs load_file in one of them | {_spread(per_gb(t['import'], gb))} | "
        f"{_spread(per_gb(t['load_file'], gb))} | {_ratio(t['import'], t['load_file']):.2f} |",
        f"| export ({out_gb:.3f} GB written, bf16) vs load_file | {_spread(per_gb(export_s, out_gb))} | "
        f"{_spread(per_gb(export_ref, gb))} | {_ratio(export_s, export_ref):.2f} |",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
