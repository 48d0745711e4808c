"""The data's own configuration: plain dataclasses, no Hydra.

``moemesh.config.schema`` registers ``DataConfig`` with Hydra as the ``data`` group's schema
(the ``moe.config.ModelConfig`` pattern), so the reader and ``scripts/prepare_data.py`` need
neither Hydra nor the rest of the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moemesh import fields
from moemesh.errors import ConfigError
from moemesh.fields import DataKind

# data.kind: where the tokens come from.
#   stdlib:    the running Python's standard library .py files as bytes (no download; the default)
#   tokens:    directories written by scripts/prepare_data.py (data.path, or a weighted data.sources)
#   memmap:    one nanoGPT-style uint16 .bin file (no document boundaries)
#   synthetic: uniform random tokens, for speed tests
KINDS = tuple(k.value for k in DataKind)
# The keys each kind reads: any other that is set is a mistake, not a setting (data.path with
# the default stdlib corpus would train on the wrong data and say nothing).
READS = {
    DataKind.stdlib: ("cache_dir",),
    DataKind.tokens: ("path", "sources", "val_path"),
    DataKind.memmap: ("path", "val_path"),
    DataKind.synthetic: (),
}
# A mixture is drawn in blocks of this many samples, each holding each source's exact share.
MIXTURE_BLOCK = 4096


@dataclass
class DataSourceConfig:
    """One source of a mixture: a prepared directory and its share of the training windows."""

    path: str = "???"  # required: OmegaConf reads "???" as MISSING
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "???"  # required: OmegaConf reads "???" as MISSING
    kind: DataKind = DataKind.stdlib
    # tokens: a prepared directory; memmap: the train .bin file.
    path: str | None = None
    # tokens: a weighted mixture of prepared directories (instead of data.path).
    sources: list[DataSourceConfig] | None = None
    # tokens: a prepared directory read whole for validation; memmap: a validation .bin file.
    # null: hold out the last val_fraction of each shard's documents (tokens, stdlib) or of
    # the file's tokens (memmap, synthetic).
    val_path: str | None = None
    cache_dir: str | None = None  # stdlib: where the built corpus is cached
    val_fraction: float = 0.01
    # Attention does not cross document boundaries (sources with a document index: tokens, stdlib).
    document_mask: bool = False
    # Steps of training batches read ahead by a background thread (0: read when needed).
    prefetch_steps: int = 1
    # A checkpoint saved on other data (another corpus, mixture, seq_len or seed): refuse it
    # (false), or resume the model and start the new data at its first window (true).
    resume_on_new_data: bool = False

    def __post_init__(self) -> None:
        fields.choice(self, "data.", "kind", DataKind)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.prefetch_steps < 0:
            raise ConfigError(f"data.prefetch_steps={self.prefetch_steps} must be >= 0 (0: read when needed)")
        for key in ("path", "sources", "val_path", "cache_dir"):
            value = getattr(self, key)
            if value is not None and key not in READS[self.kind]:
                users = [str(k) for k, keys in READS.items() if key in keys]
                raise ConfigError(
                    f"data.{key}={value} is ignored by data={self.kind}; "
                    f"it is read by data={' or data='.join(users)} (e.g. data={users[0]} data.{key}=...)"
                )
        if self.kind == DataKind.memmap and not self.path:
            raise ConfigError("data.path is required for data.kind=memmap (a uint16 token .bin file)")
        if self.kind == DataKind.tokens:
            self._check_tokens()
        if self.document_mask and self.kind not in (DataKind.stdlib, DataKind.tokens):
            raise ConfigError(
                f"data.document_mask=true needs document boundaries, which data={self.kind} does not have; "
                "valid: data=tokens (scripts/prepare_data.py) or data=stdlib"
            )

    def _check_tokens(self) -> None:
        if (self.path is None) == (self.sources is None):
            raise ConfigError(
                "data=tokens reads exactly one of data.path=DIR or data.sources=[{path: DIR, weight: W}, ...]"
                + (" (both are set)" if self.path is not None else " (neither is set)")
            )
        if self.sources is None:
            return
        if not self.sources:
            raise ConfigError("data.sources=[] is empty; valid: a list of {path: DIR, weight: W}")
        for i, src in enumerate(self.sources):
            if not src.path:
                raise ConfigError(f"data.sources[{i}].path is empty; valid: a directory of scripts/prepare_data.py")
            if not (math.isfinite(src.weight) and src.weight > 0):
                raise ConfigError(f"data.sources[{i}].weight={src.weight} must be a finite number > 0")
        total = sum(s.weight for s in self.sources)
        small = [i for i, s in enumerate(self.sources) if s.weight / total * MIXTURE_BLOCK < 1]
        if small:
            raise ConfigError(
                f"data.sources[{small[0]}].weight={self.sources[small[0]].weight} is under 1/{MIXTURE_BLOCK} of the "
                f"total {total:g}: it would get no window in a mixture block of {MIXTURE_BLOCK} samples"
            )
