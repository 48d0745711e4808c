"""The data path's three numbers, each a ratio measured in one run on this machine.

    python scripts/bench_data.py [--rounds 3] [--docs 40000] [--steps 40]

1. prepare: tokens/s of ``scripts/prepare_data.py --workers 1`` (start to metadata: the worker's
   start, reading and parsing the jsonl, hashing the input, writing the shards) over a bare
   loop of ``tokenizer.encode_batch`` (and of ``encode_batch_fast``, which prepare calls) over the
   same documents already in memory, one thread each. Goal: >= 0.8x per worker.
2. training: ``time.data`` (waiting for batches; they are read ahead by a thread) as a share of
   the step of ``python train.py`` (model=tiny, the stdlib corpus), and the tokens/s with
   ``data.document_mask=true`` over without (the mask's cost). Goal: <= 1%.
3. the loader alone: ``TokenData`` global batches of the tiny run (16 x 128 tokens, read-ahead
   off) in tokens/s, over the tiny model's training tokens/s. Goal: >= 50x.

Rounds interleave the compared cases; each prints the median and range. The tokenizer is a
byte-level BPE of 32,000 ids trained here on generated words (offline), the corpus generated
documents of 5-80 of those words.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts._args import Parser, positive_int  # noqa: E402  (errors on one line)
from scripts._child import run as run_child  # noqa: E402  (stopping the script stops train.py)

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: "per worker"
os.environ["RAYON_NUM_THREADS"] = "1"


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(xs: list[float], spec: str = ".3g") -> str:
    return f"{statistics.median(xs):{spec}} (range {min(xs):{spec}}-{max(xs):{spec}})"


def bench_prepare(work: Path, docs: int, rounds: int) -> dict:
    from tokenizers import Tokenizer

    from moemesh.data.format import read_meta
    from moemesh.data.prepare import ENCODE_BATCH, prepare
    from tests.data._corpus import documents, train_bpe, write_jsonl

    tok_dir = train_bpe(work / "tok", vocab_size=32000)
    texts = documents(docs, seed=11)
    corpus = write_jsonl(work / "corpus.jsonl", texts)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    batches = [texts[i : i + ENCODE_BATCH] for i in range(0, len(texts), ENCODE_BATCH)]

    def bare(fast: bool) -> tuple[int, float]:
        encode = tok.encode_batch_fast if fast else tok.encode_batch
        t0 = time.perf_counter()
        n = 0
        for b in batches:
            n += sum(len(e.ids) for e in encode(b, add_special_tokens=False))
        return n, time.perf_counter() - t0

    def prep(i: int) -> tuple[int, float]:
        out = work / f"out{i}"
        t0 = time.perf_counter()
        prepare(tokenizer=str(tok_dir), inputs=[str(corpus)], out=str(out), workers=1, progress=False)
        dt = time.perf_counter() - t0
        n = read_meta(out).n_tokens - docs  # without the EOS tokens between documents
        shutil.rmtree(out)
        return n, dt

    rates: dict[str, list[float]] = {"encode_batch": [], "encode_batch_fast": [], "prepare": []}
    for i in range(rounds):  # interleaved: reference, prepare, the other reference
        n, dt = bare(False)
        rates["encode_batch"].append(n / dt)
        n, dt = prep(i)
        rates["prepare"].append(n / dt)
        n, dt = bare(True)
        rates["encode_batch_fast"].append(n / dt)
    return {
        "bytes": corpus.stat().st_size,
        "tokens": n,
        "rates": rates,
        "ratio": [p / b for p, b in zip(rates["prepare"], rates["encode_batch"])],
        "ratio_fast": [p / b for p, b in zip(rates["prepare"], rates["encode_batch_fast"])],
    }


def _train(out: Path, steps: int, *extra: str) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=tiny",
        f"trainer.steps={steps}",
        "trainer.eval_every=0",
        "trainer.eval_batches=1",
        "checkpoint.save_final=false",
        "logger.console=false",
        f"hydra.run.dir={out}",
        *extra,
    ]
    proc = run_child(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"train.py failed: {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out)
    return summary


def bench_training(work: Path, steps: int, rounds: int) -> dict:
    share, tps, tps_mask = [], [], []
    for i in range(rounds):
        plain = _train(work / f"plain{i}", steps)
        masked = _train(work / f"mask{i}", steps, "data.document_mask=true")
        tb = plain["time_breakdown"]
        share.append(tb["data"] / tb["step"])
        tps.append(plain["median_tokens_per_s"])
        tps_mask.append(masked["median_tokens_per_s"])
    return {"data_share": share, "tokens_per_s": tps, "tokens_per_s_mask": tps_mask}


def bench_loader(batches: int, rounds: int) -> list[float]:
    from moemesh.data import DataConfig, TokenData, prepare_data

    spec = prepare_data(DataConfig(name="stdlib", kind="stdlib", prefetch_steps=0), seq_len=128, vocab_size=256)
    rates = []
    for r in range(rounds):
        data = TokenData(spec, seed=r)
        t0 = time.perf_counter()
        for step in range(batches):
            data.batch("train", step, global_batch=16, seq_len=128, start=0, count=16)
        rates.append(batches * 16 * 128 / (time.perf_counter() - t0))
    return rates


def bench_mask_long(seq: int, rounds: int, reps: int = 5) -> list[float]:
    """The mask's cost where it grows (S^2): the tiny model's forward+backward at ``seq`` tokens,
    2 sequences of 4 documents each, with the mask over without (seconds per step)."""
    import torch

    from moemesh.moe.config import ModelConfig
    from moemesh.moe.model import Transformer

    cfg = ModelConfig(name="tiny", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, ffn_hidden_size=512,
                      moe_ffn_hidden_size=256, num_experts=8, top_k=2, max_seq_len=seq)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    x = torch.randint(0, 256, (2, seq))
    docs = torch.arange(seq).div(seq // 4, rounding_mode="floor").expand(2, seq)

    def step(masked: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            out = model(x, x, documents_BS=docs if masked else None)
            out.loss.backward()
        return (time.perf_counter() - t0) / reps

    step(False), step(True)  # warm-up
    return [step(False) / step(True) for _ in range(rounds)]  # = masked tokens/s over plain


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--docs", type=positive_int, default=40000, help="documents in the prepare corpus")
    ap.add_argument(
        "--steps", type=positive_int, default=40, help="training steps per run (the median skips the first)"
    )
    ap.add_argument("--batches", type=positive_int, default=2000, help="global batches the loader reads per round")
    ap.add_argument(
        "--mask-seq", type=positive_int, default=1024, help="sequence length of the long-sequence mask cost"
    )
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="moemesh-bench-data-"))
    try:
        p = bench_prepare(work, args.docs, args.rounds)
        t = bench_training(work, args.steps, args.rounds)
        loader = bench_loader(args.batches, args.rounds)
        long_mask = bench_mask_long(args.mask_seq, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    train_tps = statistics.median(t["tokens_per_s"])
    mask_cost = [m / u for m, u in zip(t["tokens_per_s_mask"], t["tokens_per_s"])]
    print(f"# bench_data.py, {time.strftime('%Y-%m-%d')}, {_cpu()}, {os.cpu_count()} cores, {args.rounds} rounds\n")
    print(f"prepare: {p['bytes'] / 1e6:.1f} MB of jsonl, {p['tokens']:,} tokens, one worker / one thread")
    for name, xs in p["rates"].items():
        print(f"  {name:18s} {_fmt(xs, ',.0f')} tokens/s")
    print(f"  prepare / encode_batch      = {_fmt(p['ratio'], '.2f')}  (goal >= 0.8)")
    print(f"  prepare / encode_batch_fast = {_fmt(p['ratio_fast'], '.2f')}")
    print(f"training (model=tiny, stdlib corpus, {args.steps} steps, 16 x 128 tokens a step):")
    print(f"  time.data / time.step = {_fmt([100 * s for s in t['data_share']], '.2f')} %  (goal <= 1%)")
    print(f"  tokens/s {_fmt(t['tokens_per_s'], ',.0f')}")
    print(f"  tokens/s with data.document_mask=true {_fmt(t['tokens_per_s_mask'], ',.0f')}")
    print(f"  document mask: {_fmt(mask_cost, '.3f')} x the tokens/s without")
    print(f"  document mask at {args.mask_seq} tokens (2 sequences, fwd+bwd): {_fmt(long_mask, '.3f')} x without")
    ratio = [x / train_tps for x in loader]
    print(f"loader alone: {_fmt(loader, ',.0f')} tokens/s = {_fmt(ratio, ',.0f')} x training (goal >= 50x)")


if __name__ == "__main__":
    main()
