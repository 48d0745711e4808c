"""Reading boxes of tensors from safetensors files, each rank only the bytes it keeps.

``SliceReader.read(ref, offset, shape)`` returns the box ``offset .. offset + shape`` of the
moemesh tensor ``ref`` describes (``names.Ref``): it reads the matching rows and columns of the
transformers tensor with safetensors' ``safe_open(...).get_slice(name)[...]``, never the whole
tensor, and transposes and scales them as the Ref says. Rows past the tensor's end (the
vocabulary's padding to a multiple of tp) read as zeros.

Memory. ``get_slice`` maps the file and returns a view of the mapping: the pages a read
touches stay resident (counted in the process's RSS as file pages) until the file is closed.
So the reader closes and reopens a file after ``budget_bytes`` of reads, and splits a read
larger than a quarter of the budget into blocks of rows: at any moment a rank holds its own
parameters plus at most 1.25 budgets of mapped pages. Why not torch's DCP
``HuggingFaceStorageReader``: it keeps each file open for all of a rank's reads from it (the
pages of a whole 5 GB hub shard can stay mapped), and its planner reads boxes of the stored
tensor as stored, where moemesh needs transposed boxes (experts [D, F] from [F, D]) and parts of
fused tensors (gate and up from ``gate_up_proj``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from moemesh.interop.hf.files import TensorInfo
from moemesh.interop.hf.names import Ref

MIN_BUDGET = 16 << 20


class SliceReader:
    def __init__(self, directory: Path, index: dict[str, TensorInfo], budget_bytes: int = 256 << 20):
        self.dir, self.index = directory, index
        self.budget = max(int(budget_bytes), MIN_BUDGET)
        self._file: str | None = None
        self._handle = None
        self._stack: contextlib.ExitStack | None = None
        self._touched = 0
        self.bytes_read = 0  # the bytes of the boxes read (what this rank needed from the files)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = self._handle = self._file = None
        self._touched = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _open(self, file: str):
        if self._file != file or self._touched >= self.budget:
            from safetensors import safe_open

            self.close()
            self._stack = contextlib.ExitStack()
            self._handle = self._stack.enter_context(safe_open(str(self.dir / file), framework="pt"))
            self._file = file
        return self._handle

    def read(self, ref: Ref, offset: tuple[int, ...], shape: tuple[int, ...], out: torch.Tensor) -> None:
        """Fill ``out`` (of ``shape``, any dtype) with the box at ``offset`` of the moemesh tensor
        ``ref`` describes."""
        info = self.index[ref.name]
        lead = [slice(ref.expert, ref.expert + 1)] if ref.expert is not None else []
        # The box in the coordinates of the selected transformers matrix (or vector).
        hf_off, hf_len = (
            (list(reversed(offset)), list(reversed(shape))) if ref.transpose else (list(offset), list(shape))
        )
        for dim, span in ((0, ref.rows), (1, ref.cols)):
            if span is not None:
                hf_off[dim] += span[0]
        end0 = ref.rows[1] if ref.rows is not None else info.shape[len(lead)]
        view = out.t() if ref.transpose else out
        if hf_off[0] + hf_len[0] > end0:  # rows past the end: the vocabulary's padding to a multiple of tp
            keep = max(0, end0 - hf_off[0])
            view[keep:].zero_()
            hf_len[0] = keep
            view = view[:keep]
        self._read_rows(ref, info, lead, hf_off, hf_len, view)
        if ref.scale != 1.0:
            out.mul_(ref.scale)

    def _read_rows(self, ref: Ref, info: TensorInfo, lead, off, length, view: torch.Tensor) -> None:
        if length[0] == 0 or view.numel() == 0:
            return
        row_bytes = max(1, view[0].numel() * _itemsize(info.dtype))
        # Pages touched per row: a box narrower than the tensor's rows still maps whole rows.
        full_row = max(row_bytes, _full_row_bytes(info, len(lead)))
        block = max(1, (self.budget // 4) // full_row)
        for r0 in range(0, length[0], block):
            n = min(block, length[0] - r0)
            slices = (
                *lead,
                slice(off[0] + r0, off[0] + r0 + n),
                *(slice(o, o + k) for o, k in zip(off[1:], length[1:])),
            )
            handle = self._open(info.file)
            part = handle.get_slice(ref.name)[slices]
            if lead:
                part = part[0]
            if ref.transpose:  # cast first (contiguous), then the transposed copy: 3x faster than one strided copy
                view[r0 : r0 + n].t().copy_(part.to(view.dtype).t())
            else:
                view[r0 : r0 + n].copy_(part)
            del part
            self._touched += n * full_row
            self.bytes_read += n * row_bytes


def _itemsize(dtype: str) -> int:
    from moemesh.interop.hf.files import DTYPE_BYTES

    return DTYPE_BYTES[dtype]


def _full_row_bytes(info: TensorInfo, lead: int) -> int:
    dims = info.shape[lead + 1 :]
    n = 1
    for d in dims:
        n *= d
    return n * _itemsize(info.dtype)
