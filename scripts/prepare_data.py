"""Tokenise a corpus into shards that ``python train.py data=tokens data.path=OUT`` reads.

    python scripts/prepare_data.py --tokenizer /tok/olmoe --input corpus/*.jsonl --text-key text \\
        --out data/mycorpus --workers 2

Inputs: .jsonl/.json (one object a line), .txt/.md (a document a file), .parquet, or a directory
saved by datasets.save_to_disk. --tokenizer: a local directory (save_pretrained), a tokenizer.json,
or a Hugging Face hub name (from the local cache, or the hub when it is reachable). Killed, it
continues where it stopped when run again with the same arguments. See docs/data.md.
Exit codes: 0 done, 2 a bad argument or input (one line on stderr), 1 anything else.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moemesh.data.prepare import prepare  # noqa: E402
from moemesh.errors import ConfigError  # noqa: E402
from scripts._args import Parser  # noqa: E402  (errors on one line)


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a directory, a tokenizer.json, or a hub name")
    ap.add_argument(
        "--input", required=True, nargs="+", action="extend", help="files or directories, in this order (repeatable)"
    )
    ap.add_argument("--out", required=True, help="the directory to write (created)")
    ap.add_argument("--text-key", default="text", help="the text field of jsonl lines, parquet and datasets columns")
    ap.add_argument("--workers", type=int, default=1, help="processes, one core each")
    ap.add_argument("--shard-mb", type=float, default=64.0, help="input bytes per shard (MiB)")
    ap.add_argument("--split", default="train", help="the split of a saved DatasetDict")
    ap.add_argument("--eos-token", default=None, help="the token between documents (default: the tokenizer's EOS)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        out = prepare(
            tokenizer=args.tokenizer,
            inputs=args.input,
            out=args.out,
            text_key=args.text_key,
            workers=args.workers,
            shard_mb=args.shard_mb,
            split=args.split,
            eos_token=args.eos_token,
            progress=not args.no_progress,
        )
    except ConfigError as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare_data: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
