"""The trainer's view of the data: ``moemesh.data`` does the work (prepare, order, reading,
positions); this module keeps the names the trainer and its tests have always imported."""

from moemesh.data import Batch, DataSpec, TokenData, build_stdlib_corpus, check_data, max_token_id, prepare_data

DataPaths = DataSpec  # the name ctx.data_paths had before moemesh.data

__all__ = [
    "Batch",
    "DataPaths",
    "DataSpec",
    "TokenData",
    "build_stdlib_corpus",
    "check_data",
    "max_token_id",
    "prepare_data",
]
