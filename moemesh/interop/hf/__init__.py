"""Hugging Face checkpoints in and out: config mapping (``families``), name mapping (``names``),
untrusted files (``files``), the check before any rank starts (``check``), the sharded read
into a laid-out model (``reader``, ``load``), export (``export``) and upcycling (the
``Generated`` routers and ``names.upcycled_expert_ref``). See docs/hf.md.

This module imports no torch and no transformers: ``checkpoint_fields``, ``check_model`` and ``check_checkpoint`` run
when a command is composed (transformers is imported there, lazily, to read config.json).
"""

from moemesh.interop.hf.check import check_checkpoint
from moemesh.interop.hf.families import check_model, checkpoint_fields

__all__ = ["check_checkpoint", "check_model", "checkpoint_fields"]
