"""What refusing a hostile checkpoint costs: peak resident memory above the baseline, and time.

    python scripts/bench_hostile_checkpoint.py                 # N = 10^9; torch's reader at 10^7
    python scripts/bench_hostile_checkpoint.py --repeats 5 --out results.md

Makes three checkpoints of a tiny run once, then for each hostile file (the pickles of
tests/parallel/_checkpoint_kit.py's HOSTILE_PICKLES as the ``.metadata`` or as one tensor
entry of a shard, and further probes: the worst junk the size cap lets through, a FIFO, a
symlink to /dev/zero, a truncated metadata) plants it in a copy of the newest checkpoint,
with meta.json's checksums rewritten as an attacker would, and starts a fresh process that:

1. builds the model and its Checkpointer (the state a resume loads into);
2. reads its resident set size (VmRSS) and resets the kernel's peak counter (VmHWM, by
   writing 5 to /proc/self/clear_refs);
3. calls ``checkpoint.load`` on the hostile checkpoint, which must refuse it;
4. reports VmHWM - baseline (the peak the refusal added) and the seconds it took.

A tensor entry is reached after the metadata is read and the shards are hashed, as for a
good checkpoint: the reference row loads the good checkpoint whole. For comparison,
``--torch-n`` runs the same .metadata pickles through torch's weights-only unpickler, which
moemesh used before (at a smaller N: it does the damage). Each row is the median of
``--repeats`` processes, min-max in brackets. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts._args import Parser, non_negative_float, positive_float, positive_int  # noqa: E402

CHILD = r"""
import io, json, re, sys, time
sys.path.insert(0, sys.argv[1])
mode, target = sys.argv[2], sys.argv[3]

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

if mode == "moemesh":
    from pathlib import Path
    from moemesh.parallel import checkpoint
    from tests.parallel import _checkpoint_kit as kit
    ckpt = Path(target)
    c = kit.checkpointer(ckpt.parent)
    state = c._state()
    run = lambda: checkpoint.load(ckpt, state, check=c._check_meta, expected=c.expected())
else:
    import torch
    from moemesh.parallel import checkpoint_pickle as cp
    data = open(target, "rb").read()
    classes = [e.cls for e in cp.METADATA_GLOBALS.values() if isinstance(e, cp.Class)]
    def run():
        with torch.serialization.safe_globals(classes):
            torch._weights_only_unpickler.load(io.BytesIO(data))
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
t0 = time.perf_counter()
try:
    run()
    outcome = "loaded"
except Exception as err:
    outcome = (str(err).strip().splitlines() or [type(err).__name__])[0]
seconds = time.perf_counter() - t0
print(json.dumps({"peak": status("VmHWM") - base, "seconds": seconds, "outcome": outcome}))
"""


def _plant_metadata(payload: bytes):
    def plant(ckpt: Path) -> Path:
        from tests.parallel import _checkpoint_kit as kit

        kit.plant_metadata(ckpt, payload)
        return ckpt / ".metadata"

    return plant


def _plant_entry(payload: bytes):
    def plant(ckpt: Path) -> Path:
        from tests.parallel import _checkpoint_kit as kit

        kit.plant_entry(ckpt, "model.norm.weight", kit.tensor_entry_zip(payload))
        return ckpt / "evil.distcp"

    return plant


def _junk_at_the_cap(ckpt: Path) -> Path:
    """The most the size cap lets through, of the opcodes that keep the most alive: empty
    lists, each kept in the memo (EMPTY_LIST, LONG_BINPUT i, POP)."""
    from moemesh.parallel.checkpoint_trust import Limits
    from tests.parallel import _checkpoint_kit as kit

    keys, nbytes = kit.checkpointer(ckpt.parent).expected()
    cap = Limits(keys=keys, world=1, state_bytes=nbytes).metadata_bytes
    body = b"".join(b"]r" + i.to_bytes(4, "little") + b"0" for i in range((cap - 8) // 7))
    return _plant_metadata(b"\x80\x02" + body + b"N.")(ckpt)


def _fifo_metadata(ckpt: Path) -> Path:
    import os

    (ckpt / ".metadata").unlink()
    os.mkfifo(ckpt / ".metadata")
    return ckpt / ".metadata"


def _shard_dev_zero(ckpt: Path) -> Path:
    (shard,) = ckpt.glob("__*.distcp")
    shard.unlink()
    shard.symlink_to("/dev/zero")
    return shard


def _truncated_metadata(ckpt: Path) -> Path:

    raw = (ckpt / ".metadata").read_bytes()
    return _plant_metadata(raw[: len(raw) // 2])(ckpt)


def _named(name: str, n: int) -> str:
    return re.sub(r"\bN\b", f"{n:.0e}".replace("e+0", "e"), name)


def cases(n: int) -> dict:
    from tests.parallel import _checkpoint_kit as kit

    out = {"(reference) the good checkpoint, loaded whole": lambda ckpt: ckpt}
    for name, build in kit.HOSTILE_PICKLES.items():
        size = min(n, 10**6) if name == "dict key N tuples deep" else n  # 10^6 deep crashes plain pickle
        out[f".metadata: {_named(name, size)}"] = _plant_metadata(build(size))
        if name != "dict key N tuples deep":
            out[f"tensor entry: {_named(name, size)}"] = _plant_entry(build(size))
    out[".metadata: the worst junk the size cap admits"] = _junk_at_the_cap
    out[".metadata: half of it (truncated, resealed)"] = _truncated_metadata
    out[".metadata: a FIFO"] = _fifo_metadata
    out["shard: a symlink to /dev/zero"] = _shard_dev_zero
    return out


def _child(mode: str, target: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), mode, str(target)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        return {"peak": None, "seconds": None, "outcome": f"crashed (exit code {proc.returncode})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(values: list, fmt) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{fmt(statistics.median(vals))} [{fmt(min(vals))}-{fmt(max(vals))}]"


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_float, default=1e9, help="bytes the hostile pickles ask for (default 10^9)")
    p.add_argument(
        "--torch-n", type=non_negative_float, default=1e7, help="N for torch's weights-only unpickler (0: skip)"
    )
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--out", type=Path, help="also write the table here")
    a = p.parse_args(argv)
    from tests.parallel import _checkpoint_kit as kit

    rows = []
    with tempfile.TemporaryDirectory(prefix="moemesh-hostile-") as tmp:
        good = Path(tmp) / "good"
        kit.train_here(kit.run_config(), good)
        for name, plant in cases(int(a.n)).items():
            runs = []
            for r in range(a.repeats):
                root = Path(tmp) / f"case{r}" / "checkpoints"
                shutil.rmtree(root.parent, ignore_errors=True)
                shutil.copytree(good / "checkpoints", root)
                plant(root / "step_000003")
                runs.append(_child("moemesh", root / "step_000003"))
            rows.append(("moemesh", name, runs))
            print(f"{name}: {runs[0]['outcome'][:150]}", file=sys.stderr, flush=True)
        if a.torch_n:
            for name, build in kit.HOSTILE_PICKLES.items():
                size = min(int(a.torch_n), 10**6) if name == "dict key N tuples deep" else int(a.torch_n)
                f = Path(tmp) / "payload"
                f.write_bytes(build(size))
                runs = [_child("torch", f) for _ in range(a.repeats)]
                rows.append(("torch weights-only", f".metadata: {_named(name, size)}", runs))

    mib = 2**20
    lines = [
        f"{datetime.date.today()}, {_cpu()} ({platform.machine()}), torch {__import__('torch').__version__}, "
        f"median of {a.repeats} processes [min-max]",
        "",
        "| reader | hostile file | peak above baseline | time | outcome |",
        "|---|---|---|---|---|",
    ]
    for reader, name, runs in rows:
        peak = _cell([r["peak"] for r in runs], lambda v: f"{v / mib:.2f} MiB")
        secs = _cell([r["seconds"] for r in runs], lambda v: f"{v * 1000:.1f} ms")
        outcome = re.sub(r"\S*/checkpoints/step_000003/", "", runs[0]["outcome"]).replace("|", "/")
        outcome = outcome if len(outcome) <= 110 else outcome[:107] + "..."
        lines.append(f"| {reader} | {name} | {peak} | {secs} | {outcome} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
