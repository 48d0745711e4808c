"""A moemesh checkpoint (saved on any layout) as a Hugging Face model directory.

The checkpoint is read as data (``parallel.checkpoint_trust``: checksums, weights-only
metadata) and its tensors consolidated by DCP into one process, a layer at a time, each
under its global key; each is written as the transformers tensor ``names`` maps it to, in the
per-expert layout ``save_pretrained`` writes for the family, into safetensors files of at most
``max_shard_bytes`` (with model.safetensors.index.json when there are several). config.json
is written by transformers' config class for the family: the source's config (token ids,
context length) with the model's shapes; the tokenizer files are copied from the source
directory when it had them. A model trained with RoPE on interleaved pairs (moemesh's default)
is written with q's and k's rows reordered for the halves transformers rotates
(``moe.model.half_pairing_order``): the same function. What the family cannot express is
refused in one line (a sigmoid router, a selection bias, ...).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moemesh.data.format import process_umask
from moemesh.errors import ConfigError, first_line
from moemesh.fields import QKNorm, RopePairing, ScoreFunc
from moemesh.interop.hf.families import MOE_FAMILIES, source_family
from moemesh.interop.hf.files import (
    INDEX,
    MAX_TOKENIZER_FILE_BYTES,
    SINGLE,
    TOKENIZER_FILES,
    read_json,
    tokenizer_files,
)
from moemesh.interop.hf.names import MIXTRAL_LAYOUT, PROJ_LAYOUT, Ref, hf_ref, moemesh_keys
from moemesh.moe.config import ModelConfig, head_dim, is_moe_layer
from moemesh.moe.model import half_pairing_order

MAX_META_BYTES = 64 << 20
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# Carried from a dense source's config into its upcycled MoE's (a same-family export keeps all).
_CARRIED = ("bos_token_id", "eos_token_id", "max_position_embeddings", "initializer_range", "use_cache")


@dataclass(frozen=True)
class ExportStats:
    family: str
    tensors: int
    bytes_written: int
    files: int
    seconds: float
    tokenizer_files: int
    notes: tuple[str, ...] = ()  # what the export leaves out, for the user to know


def infer_family(cfg: ModelConfig) -> str:
    """The family a model trained from scratch is written as: the one whose options it uses."""
    if cfg.qk_norm == QKNorm.full:
        return "olmoe"
    if cfg.qk_norm == QKNorm.head:
        return "qwen3_moe"
    all_moe = all(is_moe_layer(cfg, l) for l in range(cfg.num_layers))
    if cfg.shared_expert_ffn_size or cfg.qkv_bias or not all_moe or not cfg.renormalize:
        return "qwen2_moe"
    return "mixtral"


def _refuse(family: str, what: str) -> ConfigError:
    return ConfigError(f"export as {family}: {what}, which transformers' {family} cannot express")


def check_exportable(cfg: ModelConfig, family: str) -> None:
    """One line if ``family`` cannot hold what ``cfg`` computes."""
    all_moe = all(is_moe_layer(cfg, l) for l in range(cfg.num_layers))
    norm = {"olmoe": QKNorm.full, "qwen3_moe": QKNorm.head}.get(family, QKNorm.none)
    shared = bool(cfg.shared_expert_ffn_size)
    own_head_dim = head_dim(cfg) * cfg.num_heads != cfg.hidden_size
    problems = [
        (cfg.score_func != ScoreFunc.softmax, f"model.score_func={cfg.score_func}"),
        (cfg.expert_bias_update_rate > 0, "model.expert_bias_update_rate > 0 (a selection bias on the router)"),
        (cfg.qk_norm != norm, f"model.qk_norm={cfg.qk_norm}"),
        (cfg.qkv_bias and family != "qwen2_moe", "model.qkv_bias=true"),
        (family in ("mixtral", "olmoe") and not all_moe, "dense layers among the MoE ones"),
        (family != "qwen2_moe" and shared, "a shared expert"),
        (family == "qwen2_moe" and shared != bool(cfg.shared_expert_gate), "a shared expert without its sigmoid gate"),
        (family == "mixtral" and not cfg.renormalize, "model.renormalize=false"),
        (family in ("olmoe", "qwen2_moe") and own_head_dim, f"model.head_dim={cfg.head_dim} (not hidden_size / heads)"),
        # Routing transformers' blocks do not do: the exported model would route otherwise.
        (cfg.routed_scaling_factor != 1.0, f"model.routed_scaling_factor={cfg.routed_scaling_factor}"),
        (
            cfg.router_groups > 1 and cfg.router_topk_groups not in (None, cfg.router_groups),
            f"group-limited routing (model.router_groups={cfg.router_groups}, "
            f"model.router_topk_groups={cfg.router_topk_groups})",
        ),
        (cfg.max_ranks_per_token is not None, f"model.max_ranks_per_token={cfg.max_ranks_per_token}"),
        (cfg.max_nodes_per_token is not None, f"model.max_nodes_per_token={cfg.max_nodes_per_token}"),
    ]
    for bad, what in problems:
        if bad:
            raise _refuse(family, what)


def export_config(cfg: ModelConfig, family: str, origin: dict | None, dtype: str) -> Any:
    """transformers' config object for ``family`` with the model's shapes (over the source's config)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base: dict = {}
    if origin is not None:
        base = dict(origin) if origin.get("model_type") == family else {k: origin[k] for k in _CARRIED if k in origin}
    for key in ("auto_map", "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path"):
        base.pop(key, None)
    moe_layers = sum(1 for l in range(cfg.num_layers) if is_moe_layer(cfg, l))
    fields: dict = {
        "model_type": family,
        "architectures": [ARCHITECTURES[family]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "num_experts_per_tok": cfg.top_k,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "max_position_embeddings": base.get("max_position_embeddings", cfg.max_seq_len),
        # moemesh's balance loss per layer is transformers' / top_k, which pools the layers.
        "router_aux_loss_coef": cfg.aux_loss_factor * moe_layers / cfg.top_k,
        "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
    }
    if family == "mixtral":
        fields |= {"num_local_experts": cfg.num_experts, "intermediate_size": cfg.moe_ffn_hidden_size}
        fields |= {"head_dim": head_dim(cfg), "sliding_window": None}
    elif family == "olmoe":
        fields |= {"num_experts": cfg.num_experts, "intermediate_size": cfg.moe_ffn_hidden_size}
        fields |= {"norm_topk_prob": cfg.renormalize, "clip_qkv": None, "attention_bias": False}
    else:
        dense = sorted({l for l in range(cfg.num_layers) if (l + 1) % cfg.moe_every_k_layers == 0} - _moe_set(cfg))
        fields |= {"num_experts": cfg.num_experts, "moe_intermediate_size": cfg.moe_ffn_hidden_size}
        fields |= {"intermediate_size": cfg.ffn_hidden_size, "norm_topk_prob": cfg.renormalize}
        fields |= {"decoder_sparse_step": cfg.moe_every_k_layers, "mlp_only_layers": dense}
        fields |= {"use_sliding_window": False}
        if family == "qwen2_moe":
            fields |= {"shared_expert_intermediate_size": cfg.shared_expert_ffn_size, "qkv_bias": cfg.qkv_bias}
        else:
            fields |= {"head_dim": head_dim(cfg), "attention_bias": False}
    base.pop("rope_theta", None)
    base.pop("rope_scaling", None)
    return CONFIG_MAPPING[family].from_dict({**base, **fields})


def _moe_set(cfg: ModelConfig) -> set[int]:
    return {l for l in range(cfg.num_layers) if is_moe_layer(cfg, l)}


def read_checkpoint_meta(path: Path) -> dict:
    """meta.json of a moemesh checkpoint (bounded), its files checked against their checksums."""
    from moemesh.parallel.checkpoint import CheckpointError
    from moemesh.parallel.checkpoint_trust import METADATA, verify

    meta = read_json(path / "meta.json", "checkpoint", MAX_META_BYTES)
    files = meta.get("files")
    if not isinstance(files, dict) or not isinstance(meta.get("model"), dict):
        raise ConfigError(f"checkpoint {path}: meta.json has no files or model: not a moemesh checkpoint")
    try:
        for name in sorted(files):
            if name != METADATA:
                verify(path / name, files)
        verify(path / METADATA, files)
    except CheckpointError as err:
        raise ConfigError(f"checkpoint {path}: {err}") from None
    return meta


def _limits(cfg: ModelConfig, meta: dict):
    """How large a training checkpoint of ``cfg`` may be (``checkpoint_trust.Limits``), stated
    before its metadata is read: every parameter (each routed expert apart) and its two AdamW
    moments in fp32, per-layer entries, the step, the RNG and the data position (64 allowed)."""
    from moemesh.moe.param_count import param_specs
    from moemesh.parallel.checkpoint_trust import Limits

    specs = param_specs(cfg)
    entries = sum(cfg.num_experts if s.expert else 1 for s in specs)
    numel = sum(s.numel for s in specs)
    world = meta.get("world")
    if type(world) is not int or world < 1:
        dims = [meta.get(k) for k in ("dp", "ep", "tp", "pp")]
        world = 1
        for d in dims:
            world *= d if type(d) is int and d >= 1 else 1
    return Limits(
        keys=3 * entries + 2 * cfg.num_layers + 64,
        world=world,
        state_bytes=12 * numel + 4 * cfg.num_layers * cfg.num_experts + (1 << 20),
    )


def model_config(meta: dict, path: Path) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = meta["model"]
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise ConfigError(f"checkpoint {path}: meta.json's model has {unknown[0]}, which this moemesh does not know")
    try:
        return ModelConfig(**saved)
    except ConfigError as err:
        raise ConfigError(f"checkpoint {path}: meta.json's {err}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # a value of the wrong type
        raise ConfigError(f"checkpoint {path}: meta.json's model is not a valid model config ({err})") from None


class _Shards:
    """safetensors files of at most ``limit`` bytes, written as tensors arrive."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit = out, limit
        self.buffer: dict[str, torch.Tensor] = {}
        self.size, self.written = 0, 0
        self.files: list[tuple[Path, list[str]]] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.buffer and self.size + n > self.limit:
            self.flush()
        self.buffer[name] = t.contiguous()
        self.size += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        tmp = self.out / f".part-{len(self.files):05d}.safetensors"
        save_file(self.buffer, str(tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.buffer)))
        self.written += self.size
        self.buffer, self.size = {}, 0

    def finish(self) -> int:
        import json

        self.flush()
        n = len(self.files)
        mode = 0o666 & ~process_umask()  # safetensors writes 0600: the weights as readable as the config
        for i, (tmp, names) in enumerate(self.files):
            final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.chmod(mode)
            tmp.rename(self.out / final)
            self.weight_map |= {name: final for name in names}
        if n > 1:
            index = {"metadata": {"total_size": self.written}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out / INDEX).write_text(json.dumps(index, indent=2))
        return n


def _rope_rows(cfg: ModelConfig, key: str, t: torch.Tensor) -> torch.Tensor:
    """q's and k's rows (and their biases, qk-norm weights) reordered for RoPE on halves."""
    Dh = head_dim(cfg)
    order = torch.tensor(half_pairing_order(Dh))
    if key.endswith(("attn.wq.weight", "attn.wk.weight", "qkv_bias.q", "qkv_bias.k")) or (
        key.endswith(("q_norm.weight", "k_norm.weight"))
    ):
        heads = t.shape[0] // Dh
        rows = (torch.arange(heads)[:, None] * Dh + order).flatten()
        return t[rows]
    return t


def _groups(cfg: ModelConfig) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The model's tensors a layer at a time (top-level ones first and last)."""
    keys = list(moemesh_keys(cfg))
    by_layer: dict[int, list] = {}
    top: list = []
    for key, shape in keys:
        if key.startswith("layers."):
            by_layer.setdefault(int(key.split(".")[1]), []).append((key, shape))
        else:
            top.append((key, shape))
    return [top] + [by_layer[l] for l in sorted(by_layer)]


def _zero_shared(cfg: ModelConfig, family: str) -> dict[str, tuple[int, ...]]:
    """transformers' Qwen2-MoE always has a gated shared expert: an empty one where moemesh has none."""
    if family != "qwen2_moe" or cfg.shared_expert_ffn_size:
        return {}
    D = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {}
    for l in sorted(_moe_set(cfg)):
        p = f"model.layers.{l}.mlp.shared_expert"
        out |= {f"{p}.gate_proj.weight": (0, D), f"{p}.up_proj.weight": (0, D), f"{p}.down_proj.weight": (D, 0)}
        out[f"model.layers.{l}.mlp.shared_expert_gate.weight"] = (1, D)
    return out


def export_checkpoint(
    path: Path,
    out: Path,
    *,
    dtype: str = "auto",
    tokenizer: Path | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> ExportStats:
    """Write the checkpoint at ``path`` as a transformers model directory ``out`` (new or empty)."""
    t0 = time.perf_counter()
    meta = read_checkpoint_meta(path)
    cfg = model_config(meta, path)
    origin = meta.get("hf") if isinstance(meta.get("hf"), dict) else None
    source = origin.get("config") if origin and isinstance(origin.get("config"), dict) else None
    family = (
        source_family(source)
        if source and source.get("model_type") in (*MOE_FAMILIES, "llama", "qwen2", "qwen3")
        else infer_family(cfg)
    )
    check_exportable(cfg, family)
    given = dtype
    if dtype == "auto":
        dtype = _CONFIG_DTYPES.get(str((source or {}).get("dtype") or (source or {}).get("torch_dtype")), "fp32")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype} is not one of auto, {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out={out}: exists and is not an empty directory")
    if tokenizer is not None:
        _check_tokenizer_fits(tokenizer, cfg.vocab_size)
    try:
        hf_config = export_config(cfg, family, source, dtype)
    except (TypeError, ValueError, KeyError) as err:  # the source config meta.json carries, refused by transformers
        first = first_line(err)
        raise ConfigError(f"checkpoint {path}: meta.json's hf.config makes no {family} config: {first}") from None
    made = [d for d in (out, *out.parents) if not d.exists()]  # the directories this export creates
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write(path, out, cfg, meta, family, origin, hf_config, dtype, tokenizer, max_shard_bytes, t0, given)
    except BaseException:  # a refusal, a full disk, Ctrl-C: no half-written model directory stays
        try:
            _remove_written(out, made)
        except OSError:
            pass  # the export's own error is the one to report
        raise


def _remove_written(out: Path, made: list[Path]) -> None:
    """Empty ``out`` (it was empty or absent when the export began) and remove the directories
    the export made for it (``made``: ``out`` and its missing parents, innermost first)."""
    import shutil

    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    for d in made:
        d.rmdir()


def _write(
    path, out, cfg, meta, family, origin, hf_config, dtype, tokenizer, max_shard_bytes, t0, given
) -> ExportStats:
    """The body of export_checkpoint, once ``out`` exists: the tensors, config and tokenizer."""
    import torch.distributed.checkpoint as dcp

    from moemesh.parallel.checkpoint import CheckpointError
    from moemesh.parallel.checkpoint_trust import Planner, Reader, check_sizes, read_metadata

    files = meta["files"]
    try:
        limits = _limits(cfg, meta)
        check_sizes(path, files, limits)
        metadata = read_metadata(path, limits, files)
    except CheckpointError as err:
        raise ConfigError(f"checkpoint {path}: {err}") from None
    stored = metadata.state_dict_metadata
    layout = MIXTRAL_LAYOUT if family == "mixtral" else PROJ_LAYOUT
    shards = _Shards(out, max_shard_bytes)
    n = 0
    for group in _groups(cfg):
        state = {}
        for key, shape in group:
            entry = _stored(stored, key, shape, path)
            state[f"model.{key}"] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        with warnings.catch_warnings():  # DCP's note that it assumes one process: it is one
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, storage_reader=Reader(path, metadata, files), planner=Planner(path))
        for key, shape in group:
            t = state.pop(f"model.{key}")[: shape[0]]  # the vocabulary without TP's padding
            if cfg.rope_pairing == RopePairing.interleaved:
                t = _rope_rows(cfg, key, t)
            ref = hf_ref(cfg, key, layout)
            assert isinstance(ref, Ref) and ref.rows is None and ref.expert is None, (key, ref)
            cast = t.to(DTYPES[dtype])  # cast while contiguous, then transpose the (smaller) result
            if not torch.isfinite(cast).all():
                raise ConfigError(_not_finite(path, key, ref.name, t, dtype, given))
            t = cast
            shards.add(ref.name, t.t().contiguous() if ref.transpose else t)
            n += 1
    for name, shape in _zero_shared(cfg, family).items():
        shards.add(name, torch.zeros(shape, dtype=DTYPES[dtype]))
    files = shards.finish()
    hf_config.save_pretrained(str(out))
    copied = _copy_tokenizer(tokenizer or (Path(origin["source"]) if origin and origin.get("source") else None), out)
    notes: tuple[str, ...] = ()
    if cfg.capacity_factor is not None:
        notes = (
            f"model.capacity_factor={cfg.capacity_factor} is not exported: transformers' {family} block "
            "routes every token (dropless), so it computes what this model does only where the run dropped none",
        )
    return ExportStats(family, n, shards.written, files, time.perf_counter() - t0, copied, notes)


def _not_finite(path: Path, key: str, name: str, t: torch.Tensor, dtype: str, given: str = "") -> str:
    """Why a tensor cannot be written: inf/nan in the checkpoint, or values beyond ``dtype``'s range
    (``given``: the --dtype typed, auto when the source's config chose ``dtype``)."""
    if not torch.isfinite(t).all():
        return f"checkpoint {path}: {key} holds inf or nan values; export a checkpoint from before they appeared"
    top = float(t.abs().max())
    flag = f"--dtype=auto ({dtype}, the source config's)" if given == "auto" else f"--dtype={dtype}"
    return (
        f"{flag}: {name} has values up to {top:.4g}, beyond {dtype}'s largest "
        f"({torch.finfo(DTYPES[dtype]).max:.4g}); write bf16 or fp32 instead"
    )


def _stored(stored: dict, key: str, shape: tuple[int, ...], path: Path) -> Any:
    """The checkpoint's entry for ``key``, a tensor of the shape the model needs (the vocabulary
    may carry TP's padding in a checkpoint saved before it was left out); ConfigError otherwise."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entry = stored.get(f"model.{key}")
    if not isinstance(entry, TensorStorageMetadata):
        raise ConfigError(f"checkpoint {path}: no tensor model.{key} (saved by another model?)")
    size = tuple(entry.size)
    padded = key in ("embed.weight", "head.weight") and size[0] >= shape[0]
    if size[1:] != tuple(shape[1:]) or not (size[0] == shape[0] or padded):
        raise ConfigError(
            f"checkpoint {path}: tensor model.{key} is {list(size)}, but the model its meta.json names "
            f"needs {list(shape)}"
        )
    return entry


def _check_tokenizer_fits(source: Path, vocab_size: int) -> None:
    """--tokenizer's ids must all be rows of the model's embedding (transformers would index past
    it at the first such token). Read from its tokenizer.json (size-bounded) when it has one. A
    directory with no tokenizer file is refused: the user asked for one, and would get none."""
    held = [f for f in tokenizer_files(source) if f.name != "generation_config.json"]
    if not held:
        names = ", ".join(n for n in TOKENIZER_FILES if n != "generation_config.json")
        raise ConfigError(
            f"--tokenizer={source}: holds no tokenizer file ({names}, each at most "
            f"{MAX_TOKENIZER_FILE_BYTES >> 20} MiB); give the directory tokenizer.save_pretrained() wrote"
        )
    found = [f for f in held if f.name == "tokenizer.json"]
    if not found:
        return
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(found[0]))
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's
        raise ConfigError(
            f"--tokenizer={source}: tokenizer.json is not one the tokenizers library reads: {first_line(err)}"
        ) from None
    ids = 1 + max(backend.get_vocab(with_added_tokens=True).values(), default=-1)
    if ids > vocab_size:
        raise ConfigError(
            f"--tokenizer={source} has {ids:,} token ids, more than the checkpoint's model.vocab_size={vocab_size:,} "
            "embeds: export with the tokenizer the model was trained with"
        )


def _copy_tokenizer(source: Path | None, out: Path) -> int:
    """Copy the tokenizer files (and generation_config.json) of ``source``; how many of them are
    the tokenizer's (AutoTokenizer loads the export when there is one)."""
    if source is None or not source.is_dir():
        return 0
    found = tokenizer_files(source)
    for f in found:
        shutil.copyfile(f, out / f.name)
    return sum(f.name != "generation_config.json" for f in found)
