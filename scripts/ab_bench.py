"""A/B one command between two commits of this repository, interleaved, in one run.

    python scripts/ab_bench.py --before 68fa2a8 [--after HEAD] [--rounds 3] --regex 'step ([\\d.]+) ms' \\
        -- train.py trainer.steps=30 trainer.eval_every=0 checkpoint.save_final=false 'hydra.run.dir={out}'
    python scripts/ab_bench.py --before 68fa2a8 --json summary.json:median_tokens_per_s \\
        -- train.py trainer.steps=30 trainer.eval_every=0 checkpoint.save_final=false 'hydra.run.dir={out}'

Each commit is checked out into its own temporary git worktree; the command runs there
(``python <script> args``) alternately, before/after, ``--rounds`` times, so both
sides see the same machine load. ``{out}`` in an argument becomes a fresh directory
per run; ``--json FILE:KEY`` reads KEY from {out}/FILE, ``--regex`` takes group 1 of
the first match in stdout+stderr, ``--wall`` the command's own wall-clock seconds (its
start-up included: what a user waits for). Prints each side's median and the
after/before ratio. Used to hold refactors to "not slower" (benchmarks/RESULTS.md).

    python scripts/ab_bench.py --before fe178ec --wall --rounds 5 \
        -- train.py parallel=dp2 trainer.steps=3 'hydra.run.dir={out}'
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts._args import Parser, positive_int  # noqa: E402  (errors on one line)


def _worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), ref], check=True)
    return where


def _measure(tree: Path, command: list[str], out: Path, a) -> float:
    out.mkdir(parents=True)
    args = [c.replace("{out}", str(out)) for c in command]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=tree, capture_output=True, text=True)
    wall_s = time.monotonic() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        sys.exit(f"ab_bench: {' '.join(args)} failed in {tree} (exit {proc.returncode}): {tail}")
    if a.wall:
        return wall_s
    if a.json:
        file, key = a.json.rsplit(":", 1)
        return float(json.loads((out / file).read_text())[key])
    found = re.search(a.regex, proc.stdout + proc.stderr)
    if not found:
        sys.exit(f"ab_bench: --regex {a.regex!r} matched nothing in the output of {' '.join(args)}")
    return float(found.group(1))


def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git ref of the reference side")
    p.add_argument("--after", default="HEAD", help="git ref of the measured side (default HEAD)")
    p.add_argument("--rounds", type=positive_int, default=3)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--json", help="FILE:KEY read from the run's {out} directory")
    what.add_argument("--regex", help="a regex whose group 1 is the number, searched in the output")
    what.add_argument("--wall", action="store_true", help="the command's wall-clock seconds, start-up included")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py args... (run with this Python)")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the command after --, e.g. -- train.py trainer.steps=30")
    values: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="moemesh-ab-") as tmp:
        trees = {side: Path(tmp) / side for side in values}
        try:
            for side, ref in (("before", a.before), ("after", a.after)):
                _worktree(ref, trees[side])
            for r in range(a.rounds):
                for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    values[side].append(_measure(trees[side], command, Path(tmp) / f"out-{side}-{r}", a))
                    print(f"round {r + 1} {side}: {values[side][-1]:.4g}", flush=True)
        finally:
            for tree in trees.values():
                remove = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)]
                subprocess.run(remove, capture_output=True)
    before, after = (statistics.median(values[s]) for s in ("before", "after"))
    print(f"before {a.before}: median {before:.4g} of {values['before']}")
    print(f"after  {a.after}: median {after:.4g} of {values['after']}")
    print(f"after / before = {after / before:.3f}")


if __name__ == "__main__":
    main()
