"""Export a moemesh checkpoint (saved on any layout) as a Hugging Face model directory.

    python scripts/export_hf.py outputs/<run>/checkpoints/step_000300 --out exported/
    python scripts/export_hf.py outputs/<run>/checkpoints --out exported/   # the newest checkpoint

transformers' ``AutoModelForCausalLM.from_pretrained("exported/")`` then loads it, and so do
lm-eval-harness and vLLM (docs/hf.md). The source's config and tokenizer files come along when
the run imported a model (``model.hf_path``); ``--tokenizer DIR`` names them otherwise. A
mistake is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemesh.errors import ConfigError  # noqa: E402
from scripts._args import Parser  # noqa: E402  (errors on one line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint (step_NNNNNN with meta.json) or a directory of them")
    p.add_argument("--out", required=True, help="the model directory to write (new or empty)")
    p.add_argument("--dtype", default="auto", help="auto (the source's, else fp32) | bf16 | fp16 | fp32")
    p.add_argument("--tokenizer", default=None, help="copy the tokenizer files from this directory")
    p.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="the largest safetensors file, in GB (> 0, <= 1e6; default 5)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from moemesh.interop.hf.export import export_checkpoint
    from moemesh.parallel.checkpoint import resolve

    try:
        found = resolve(args.checkpoint, Path(args.checkpoint))
        if not found:
            raise ConfigError(f"{args.checkpoint}: no complete checkpoint (a step_NNNNNN directory with meta.json)")
        if not 0 < args.max_shard_gb <= 1e6:
            raise ConfigError(f"--max-shard-gb={args.max_shard_gb} must be a size in GB, > 0 and <= 1e6, e.g. 5")
        if args.tokenizer and not Path(args.tokenizer).is_dir():
            raise ConfigError(f"--tokenizer={args.tokenizer}: not a directory (one that holds tokenizer.json ...)")
        stats = export_checkpoint(
            found[0],
            Path(args.out),
            dtype=args.dtype,
            tokenizer=Path(args.tokenizer) if args.tokenizer else None,
            max_shard_bytes=int(args.max_shard_gb * 1e9),
        )
    except ConfigError as err:
        print(f"moemesh: export error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # --out cannot be made or written, or a file cannot be read
        out = not err.filename or str(err.filename).startswith(str(args.out))
        where = f"--out={args.out}" if out else err.filename
        print(f"moemesh: export error: {where}: {err.strerror or err}", file=sys.stderr)
        return 2
    tok = (
        f", {stats.tokenizer_files} tokenizer files"
        if stats.tokenizer_files
        else ", no tokenizer files (--tokenizer DIR copies them; AutoTokenizer needs them)"
    )
    for note in stats.notes:
        print(f"moemesh: note: {note}", file=sys.stderr)
    print(
        f"moemesh: exported {found[0]} as {stats.family}: {stats.tensors} tensors, "
        f"{stats.bytes_written / 2**20:,.1f} MiB in {stats.files} file(s){tok}, {stats.seconds:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
