"""A checkpoint's config.json as moemesh model options, and back (config mapping).

transformers' own config classes read config.json (defaults, renamed keys, the rope
parameters of old and new configs), chosen by ``model_type`` from those listed here, never
through ``trust_remote_code``. The shape keys must be in config.json itself: a missing one is
refused in one line naming it, rather than taken from transformers' defaults (a Mixtral
config without ``num_local_experts`` is a broken config, not an 8-expert one). A setting
moemesh does not build (another activation, a bias on o_proj, sliding-window attention, a
scaled RoPE) is refused in one line naming it.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from moemesh.errors import ConfigError
from moemesh.interop.hf.files import checkpoint_dir, read_json

MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
DENSE_FAMILIES = ("llama", "qwen2", "qwen3")
# A dense family's upcycled MoE is exported as this family (same attention, routed experts).
UPCYCLED_AS = {"llama": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# Keys config.json must state (alternatives: any of them), per family.
REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {
    "mixtral": (("num_local_experts", "num_experts"), ("num_experts_per_tok",)),
    "olmoe": (("num_experts",), ("num_experts_per_tok",)),
    "qwen2_moe": (("num_experts",), ("num_experts_per_tok",), ("moe_intermediate_size",)),
    "qwen3_moe": (("num_experts", "num_local_experts"), ("num_experts_per_tok",), ("moe_intermediate_size",)),
    "llama": (),
    "qwen2": (),
    "qwen3": (),
}
# Fields a mapping sets whose override on the command line is a choice, not a contradiction.


def read_config(d: Path, what: str = "model.hf_path") -> tuple[dict, Any]:
    """config.json of checkpoint directory ``d``: (the raw JSON, transformers' config object)."""
    raw = read_json(d / "config.json", what)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{what}: {d / 'config.json'} has no model_type, so its architecture is unknown")
    if model_type not in MOE_FAMILIES + DENSE_FAMILIES:
        remote = " (its auto_map asks for trust_remote_code: moemesh never runs code from a checkpoint)"
        raise ConfigError(
            f"{what}: config.json's model_type={model_type!r} is not supported"
            f"{remote if 'auto_map' in raw else ''}; supported: {', '.join(MOE_FAMILIES)}, "
            f"and dense {', '.join(DENSE_FAMILIES)} for upcycling (model.upcycle.num_experts)"
        )
    for alternatives in [(k,) for k in _SHAPE] + list(REQUIRED[model_type]):
        if not any(k in raw for k in alternatives):
            raise ConfigError(
                f"{what}: {d / 'config.json'} ({model_type}) has no {alternatives[0]}, "
                "so moemesh cannot tell the architecture's shape"
            )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # lazily: transformers imports torch
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings (a rope_scaling it rewrites) would make a refusal two lines
    try:
        hf = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in raw.items() if k != "auto_map"})
    except Exception as err:  # transformers' own validation of the values
        # transformers' text may take several lines (a field's name, then what it expected): join them.
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
        raise ConfigError(f"{what}: {d / 'config.json'}: {type(err).__name__}: {text}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return raw, hf


def _refuse(what: str, key: str, value: object, why: str) -> ConfigError:
    return ConfigError(f"{what}: config.json's {key}={value!r} is not supported: {why}")


def _check_unsupported(hf: Any, model_type: str, what: str) -> None:
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise _refuse(what, "hidden_act", act, "moemesh's FFNs and experts are SwiGLU (silu)")
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise _refuse(
            what, "rope_parameters.rope_type", rope.get("rope_type"), "moemesh builds unscaled RoPE (default)"
        )
    if getattr(hf, "attention_bias", False):
        raise _refuse(what, "attention_bias", True, "a bias on o_proj (moemesh has q/k/v biases, model.qkv_bias)")
    if getattr(hf, "mlp_bias", False):
        raise _refuse(what, "mlp_bias", True, "moemesh's FFNs have no biases")
    if getattr(hf, "clip_qkv", None) is not None:
        raise _refuse(what, "clip_qkv", hf.clip_qkv, "moemesh does not clamp q, k, v")


def _check_window(hf: Any, model_type: str, max_seq_len: int, what: str) -> None:
    """Sliding-window attention is refused unless the window covers every position moemesh trains on."""
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None) or []
    used = "sliding_attention" in types or (model_type == "mixtral" and window is not None)
    if used and window and window < max_seq_len:
        raise ConfigError(
            f"{what}: config.json's sliding_window={window} is not supported (moemesh attends to the whole "
            f"sequence); it equals full attention for model.max_seq_len <= {window}"
        )


def _attention(hf: Any, raw: dict, model_type: str) -> dict:
    H = hf.num_attention_heads
    Dh = getattr(hf, "head_dim", None) or hf.hidden_size // H
    rope = getattr(hf, "rope_parameters", None) or {}
    return {
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "num_layers": hf.num_hidden_layers,
        "num_heads": H,
        "num_kv_heads": getattr(hf, "num_key_value_heads", None) or H,
        "head_dim": None if Dh * H == hf.hidden_size else Dh,
        "qk_norm": {"olmoe": "full", "qwen3_moe": "head", "qwen3": "head"}.get(model_type, "none"),
        "qkv_bias": model_type == "qwen2" or (model_type == "qwen2_moe" and bool(getattr(hf, "qkv_bias", True))),
        "tie_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "rope_pairing": "half",
        "rope_theta": float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        "norm_eps": float(hf.rms_norm_eps),
        "ffn_hidden_size": hf.intermediate_size,
        "score_func": "softmax",
    }


def _moe(hf: Any, model_type: str, what: str) -> tuple[dict, dict]:
    """The routed part of an MoE family: (architecture fields, chosen fields' defaults)."""
    E, K = hf.num_local_experts if model_type == "mixtral" else hf.num_experts, hf.num_experts_per_tok
    arch: dict = {"num_experts": E, "top_k": K}
    chosen: dict = {"moe_every_k_layers": 1, "first_k_dense_layers": 0, "dense_layers": []}
    if model_type in ("mixtral", "olmoe"):
        arch["moe_ffn_hidden_size"] = hf.intermediate_size
    else:
        arch["moe_ffn_hidden_size"] = hf.moe_intermediate_size
        chosen["moe_every_k_layers"] = hf.decoder_sparse_step
        chosen["dense_layers"] = sorted(int(l) for l in (hf.mlp_only_layers or []))
    arch["renormalize"] = True if model_type == "mixtral" else bool(hf.norm_topk_prob)
    shared = getattr(hf, "shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
    arch["shared_expert_ffn_size"] = shared
    arch["shared_expert_gate"] = bool(shared)
    L = hf.num_hidden_layers
    step = chosen["moe_every_k_layers"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ConfigError(f"{what}: config.json's decoder_sparse_step={step!r} must be an integer >= 1")
    if L % step:
        raise ConfigError(
            f"{what}: config.json's decoder_sparse_step={chosen['moe_every_k_layers']} does not divide "
            f"num_hidden_layers={L}, which moemesh's model.moe_every_k_layers requires"
        )
    k = chosen["moe_every_k_layers"]
    # counted, not looped: config.json's num_hidden_layers is untrusted (10^12 hung a loop here)
    moe_layers = L // k - sum(1 for l in set(chosen["dense_layers"]) if 0 <= l < L and (l + 1) % k == 0)
    # transformers' balance loss is K x moemesh's per layer and pools the layers (about their mean).
    coef = float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0)
    chosen["aux_loss_factor"] = coef * K / max(moe_layers, 1)
    return arch, chosen


def _check_upcycle(upcycle: dict) -> None:
    """``model.upcycle``'s own rules (``UpcycleConfig``), before any is used here: a granularity of 0
    divided the FFN's size (a ZeroDivisionError while resolving), and a negative count of experts
    read as "not upcycling"."""
    from dataclasses import fields

    from moemesh.moe.config import UpcycleConfig

    known = {f.name for f in fields(UpcycleConfig)}
    UpcycleConfig(**{k: v for k, v in upcycle.items() if k in known})


def _upcycled(hf: Any, upcycle: dict, what: str) -> tuple[dict, dict]:
    E, K, g = int(upcycle.get("num_experts", 0)), int(upcycle.get("top_k", 2)), int(upcycle.get("granularity", 1))
    if hf.intermediate_size % g:
        raise ConfigError(
            f"model.upcycle.granularity={g} must divide the dense FFN's intermediate_size={hf.intermediate_size} "
            f"({what}'s config.json): each expert takes 1/{g} of its hidden units"
        )
    arch = {
        "num_experts": E,
        "top_k": K,
        "moe_ffn_hidden_size": hf.intermediate_size // g,
        "renormalize": True,  # with copies, renormalised top-k weights make the MoE the dense FFN
        "shared_expert_ffn_size": 0,
        "shared_expert_gate": False,
    }
    return arch, {"moe_every_k_layers": 1, "first_k_dense_layers": 0, "dense_layers": [], "aux_loss_factor": 0.01}


def model_fields(d: Path, raw: dict, hf: Any, upcycle: dict, what: str = "model.hf_path") -> tuple[dict, dict]:
    """ModelConfig fields from a checkpoint: (architecture, whose override is refused unless equal;
    chosen, the defaults of fields a command may set otherwise)."""
    model_type = raw["model_type"]
    _check_upcycle(upcycle)
    _check_unsupported(hf, model_type, what)
    arch = _attention(hf, raw, model_type)
    upcycling = int(upcycle.get("num_experts", 0) or 0) > 0
    if model_type in DENSE_FAMILIES:
        if not upcycling:
            raise ConfigError(
                f"{what}={d}: a dense {model_type} model; set model.upcycle.num_experts (and model.upcycle.top_k) "
                "to upcycle it into an MoE (docs/hf.md)"
            )
        part, chosen = _upcycled(hf, upcycle, what)
    else:
        if upcycling:
            raise ConfigError(
                f"model.upcycle.num_experts={upcycle.get('num_experts')}: {what}={d} is already an MoE "
                f"({model_type}); upcycling starts from a dense {'/'.join(DENSE_FAMILIES)} model"
            )
        part, chosen = _moe(hf, model_type, what)
    chosen["name"] = model_name(d)
    pad = raw.get("pad_token_id")
    chosen["pad_token_id"] = pad if isinstance(pad, int) and 0 <= pad < hf.vocab_size else None
    chosen["max_seq_len"] = int(getattr(hf, "max_position_embeddings", 4096))
    return {**arch, **part}, chosen


# The config.json key each model field is read from, for a message about a value found there.
_CONFIG_KEY = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "ffn_hidden_size": "intermediate_size",
    "top_k": "num_experts_per_tok",
    "num_experts": "num_local_experts or num_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size or intermediate_size",
    "max_seq_len": "max_position_embeddings",
}


def read_from_config(path: str, key: str, value: object, upcycle: tuple = ()) -> str | None:
    """Where model field ``key``'s ``value`` came from, if from checkpoint ``path``'s
    config.json (not an override): "<path>/config.json's num_hidden_layers"; else None."""
    if key not in _CONFIG_KEY:
        return None
    try:
        fields = checkpoint_fields(path, upcycle)
    except ConfigError:
        return None
    if key not in fields or not _same(value, fields[key]):
        return None
    return f"{checkpoint_dir(path) / 'config.json'}'s {_CONFIG_KEY[key]}"


def model_name(d: Path) -> str:
    """The model's name for logs and dashboards: its directory's, or in the hub's cache
    (``models--mistralai--Mixtral-8x7B-v0.1/snapshots/<commit>``) the repository's,
    ``mistralai/Mixtral-8x7B-v0.1``, not the commit hash."""
    path = d.resolve()
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--") and len(repo) > len("models--"):
        return repo[len("models--") :].replace("--", "/")
    return path.name


def _same(given: object, value: object) -> bool:
    if isinstance(value, float) and isinstance(given, (int, float)) and not isinstance(given, bool):
        return math.isclose(float(given), value, rel_tol=1e-9)
    if isinstance(value, list):
        return isinstance(given, (list, tuple)) and [int(x) for x in given] == value
    if value is None or isinstance(value, (bool, int)):
        return given == value and type(given) is type(value)
    return str(given) == str(value)


@functools.lru_cache(maxsize=16)
def _resolved(path: str, upcycle: tuple) -> tuple[dict, dict, str, Any]:
    d = checkpoint_dir(path)
    raw, hf = read_config(d)
    arch, chosen = model_fields(d, raw, hf, dict(upcycle))
    return arch, chosen, raw["model_type"], hf


def checkpoint_fields(path: str, upcycle: tuple = ()) -> dict:
    """Every model field ``model=hf`` reads from checkpoint ``path``'s config.json (``upcycle``:
    the items of ``model.upcycle``), for conf/model/hf.yaml's ``${hf:<field>}``."""
    arch, chosen, _, _ = _resolved(path, upcycle)
    return {**arch, **chosen}


def check_model(cfg: Any) -> None:
    """The typed model config of a command with ``model.hf_path``: its architecture is the
    checkpoint's (an override of an architecture key is refused, one line) and its
    ``max_seq_len`` stays inside any sliding window."""
    upcycle = tuple(sorted(vars(cfg.upcycle).items()))
    arch, _, model_type, hf = _resolved(str(cfg.hf_path), upcycle)
    differ = [(key, getattr(cfg, key), value) for key, value in arch.items() if not _same(getattr(cfg, key), value)]
    if len(differ) >= 3:  # not an override or two: another preset's whole architecture
        key, given, value = differ[0]
        raise ConfigError(
            f"model.hf_path is set, but {len(differ)} architecture keys are not its config.json's "
            f"(model.{key}={given}, config.json says {value!r}): add model=hf, which takes the architecture "
            "from the checkpoint"
        )
    if differ:
        key, given, value = differ[0]
        raise ConfigError(
            f"model.{key}={given}: model.hf_path's config.json says {value!r}, and model=hf takes the "
            "architecture from the checkpoint (drop the override)"
        )
    _check_window(hf, model_type, cfg.max_seq_len, "model.hf_path")


def source_family(raw: dict) -> str:
    """The family an export writes for a checkpoint imported from config ``raw`` (an upcycled
    dense model becomes its MoE sibling)."""
    model_type = raw["model_type"]
    return UPCYCLED_AS.get(model_type, model_type)


def origin_meta(cfg: Any) -> dict:
    """What a checkpoint's meta.json records of an imported model (its ``"hf"`` entry), so that an
    export writes the source's config (token ids, context length, dtype) and finds its tokenizer."""
    d = checkpoint_dir(str(cfg.hf_path))
    raw = read_json(d / "config.json", "model.hf_path")
    return {"source": str(d.resolve()), "model_type": raw.get("model_type"), "config": raw}
