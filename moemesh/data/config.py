"""The data's own configuration: plain dataclasses, no Hydra.

``moemesh.config.schema`` registers ``DataConfig`` with Hydra as the ``data`` group's schema
(the ``moe.config.ModelConfig`` pattern), so the reader and ``scripts/prepare_data.py`` need
neither Hydra nor the rest of the config.
"""

from __future__ import annotations

from dataclasses import dataclass

# data.kind: where the tokens come from.
#   stdlib:    the running Python's standard library .py files as bytes (no download; the default)
#   tokens:    directories written by scripts/prepare_data.py (data.path, or a weighted data.sources)
#   memmap:    one nanoGPT-style uint16 .bin file (no document boundaries)
#   synthetic: uniform random tokens, for speed tests
KINDS = ("stdlib", "tokens", "memmap", "synthetic")


@dataclass
class DataSourceConfig:
    """One source of a mixture: a prepared directory and its share of the training windows."""

    path: str = "???"  # required: OmegaConf reads "???" as MISSING
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "???"  # required: OmegaConf reads "???" as MISSING
    kind: str = "stdlib"
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
