"""Corpora and tokenizers the data tests make themselves (offline): a byte-level BPE trained
here with the tokenizers library, to a vocabulary above 65,535 by training alone (60,000
random words give it enough merges), and prepared directories written directly."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

from moemesh.data.format import dtype_for, meta_json, write_shard

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words(n: int = 60000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def documents(n: int, seed: int = 1, vocab: list[str] | None = None) -> list[str]:
    """``n`` documents of 5-80 words (drawn from the tokenizer's training words)."""
    rng = random.Random(seed)
    vocab = vocab or words()
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 80))) for _ in range(n)]


def train_bpe(directory: Path, vocab_size: int = 70000) -> Path:
    """A byte-level BPE with an <|endoftext|> EOS, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    vocab = words()
    lines = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(6000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    return directory


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_corpus(
    directory: Path,
    shards: list[list[int]],
    *,
    vocab_size: int,
    start: int = 0,
    tokenizer: str = "test-ids",
) -> Path:
    """A prepared directory whose tokens are start, start+1, ... (every token distinct, so a test
    can tell which positions were read); ``shards`` lists each shard's document lengths."""
    directory.mkdir(parents=True, exist_ok=True)
    metas, next_id = [], start
    for i, lengths in enumerate(shards):
        n = sum(lengths)
        tokens = np.arange(next_id, next_id + n, dtype=np.int64) % vocab_size
        next_id += n
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64)
        metas.append(write_shard(directory, i, tokens, offsets, dtype_for(vocab_size)))
    tok = {"name": tokenizer, "sha256": hashlib.sha256(tokenizer.encode()).hexdigest()}
    (directory / "moemesh-data.json").write_bytes(
        meta_json(tokenizer=tok, vocab_size=vocab_size, eos_id=None, special_ids={}, shards=metas, extra={})
    )
    return directory
