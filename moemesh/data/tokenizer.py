"""Obtaining a tokenizer for ``scripts/prepare_data.py``: the only place that imports
transformers or tokenizers, and only when called (training never needs them).

``--tokenizer`` is a local directory (``save_pretrained``'s files), a ``tokenizer.json`` file,
or a Hugging Face hub name. A name is resolved by ``AutoTokenizer.from_pretrained``: from the
local cache (``HF_HOME``) when it is there, else from the hub when the hub is reachable; with
neither (an offline machine, ``HF_HUB_OFFLINE=1``) it fails in one line naming the name. Remote
code is never run (``trust_remote_code=False``).

A tokenizer's identity is the sha256 of its canonical serialisation (the fast tokenizer's
``tokenizer.json`` as the ``tokenizers`` library writes it: vocabulary, merges, normaliser,
pre-tokeniser, added tokens): exactly what decides the ids. Two copies of one tokenizer in
different directories are the same tokenizer; a README edited beside it changes nothing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import ConfigError
from moemesh.untrusted import regular_file

MAX_TOKENIZER_BYTES = 1 << 30  # every file of a tokenizer directory together, checked before loading


@dataclass(frozen=True)
class TokenizerInfo:
    """What prepare needs: the canonical JSON the workers rebuild it from, and the metadata."""

    name: str
    backend_json: str  # tokenizers.Tokenizer.to_str(): workers rebuild it with from_str
    sha256: str
    vocab_size: int
    eos_id: int | None
    special_ids: dict
    files: dict  # file name -> sha256, for a local directory
    cls: str

    def as_meta(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "class": self.cls, "files": self.files}


# A model directory holds the tokenizer beside the weights; no tokenizer reads these.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")


def _dir_files(d: Path) -> dict:
    """sha256 of each file of tokenizer directory ``d`` (its identity), weights left out."""
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))
    total = sum(regular_file(p, "--tokenizer").st_size for p in files)
    if total > MAX_TOKENIZER_BYTES:
        raise ConfigError(
            f"--tokenizer={d}: its files hold {total:,} bytes, more than {MAX_TOKENIZER_BYTES:,}; "
            "name its tokenizer.json, or a directory of the tokenizer's files alone"
        )
    out = {}
    for p in files:
        with open(p, "rb") as f:
            out[p.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else text


def load_tokenizer(spec: str, *, eos_token: str | None = None) -> TokenizerInfo:
    """The tokenizer ``spec`` names (see the module docstring); ConfigError in one line if it cannot be had."""
    path = Path(spec).expanduser()
    files: dict = {}
    if path.is_file():
        regular_file(path, "--tokenizer")
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ConfigError(f"--tokenizer={spec}: more than {MAX_TOKENIZER_BYTES:,} bytes")
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as err:
            raise ConfigError(
                f"--tokenizer={spec}: not a tokenizer.json the tokenizers library reads ({_one_line(err)})"
            ) from None
        files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
        vocab = backend.get_vocab_size(with_added_tokens=True)
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        eos_name = eos_token or next(
            (t for t in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]") if t in specials), None
        )
        eos = specials.get(eos_name) if eos_name else None
        if eos_token and eos is None:
            raise ConfigError(f"--eos-token={eos_token} is not a special token of {spec}")
        cls = "tokenizers.Tokenizer"
        special_ids = dict(sorted((k, int(v)) for k, v in specials.items()))
    else:
        if path.is_dir():
            files = _dir_files(path)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ConfigError(f"--tokenizer={spec}: needs the transformers package ({err})") from None
        try:
            tok = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else spec, trust_remote_code=False)
        except Exception as err:
            where = (
                "a local directory that AutoTokenizer cannot read"
                if path.is_dir()
                else "not a local directory or file, and neither the local Hugging Face cache (HF_HOME) nor the hub "
                "could provide it (offline: pass a directory written by save_pretrained)"
            )
            raise ConfigError(f"--tokenizer={spec}: {where}: {_one_line(err)}") from None
        if not getattr(tok, "is_fast", False):
            raise ConfigError(f"--tokenizer={spec}: {type(tok).__name__} has no fast (tokenizer.json) version")
        backend = tok.backend_tokenizer
        vocab = max(len(tok), backend.get_vocab_size(with_added_tokens=True))
        special_ids = {
            name: int(getattr(tok, f"{name}_token_id"))
            for name in ("bos", "eos", "pad", "unk", "sep", "cls")
            if getattr(tok, f"{name}_token_id", None) is not None
        }
        eos = special_ids.get("eos", special_ids.get("sep"))
        if eos_token is not None:
            named = tok.convert_tokens_to_ids(eos_token)
            eos = named if isinstance(named, int) else None
            if eos is None or eos == tok.unk_token_id:
                raise ConfigError(f"--eos-token={eos_token} is not a token of {spec}")
        cls = type(tok).__name__
    if eos is None:
        raise ConfigError(
            f"--tokenizer={spec} has no EOS (or separator) token to put between documents; name one with --eos-token"
        )
    # Ids need not be contiguous (a WordLevel vocabulary with gaps): the size the model needs,
    # and the shards' dtype, is one past the largest id.
    vocab = max(vocab, 1 + max(backend.get_vocab(with_added_tokens=True).values(), default=-1))
    backend_json = backend.to_str()
    return TokenizerInfo(
        name=spec if not path.exists() else str(path.resolve()),
        backend_json=backend_json,
        sha256=hashlib.sha256(backend_json.encode()).hexdigest(),
        vocab_size=int(vocab),
        eos_id=int(eos),
        special_ids=special_ids,
        files=files,
        cls=cls,
    )
