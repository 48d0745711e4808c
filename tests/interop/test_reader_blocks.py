"""interop/hf/reader.SliceReader reads a box of a tensor in blocks of rows (a quarter of its
memory budget each): every block must land at its own rows. The tiny models of the other tests
fit in one block; a real embedding (151,936 x 2,048) takes dozens."""

import torch
from safetensors.torch import save_file

from moemesh.interop.hf.files import tensor_index
from moemesh.interop.hf.names import Ref
from moemesh.interop.hf.reader import MIN_BUDGET, SliceReader


def test_a_box_of_many_blocks_reads_each_block_at_its_rows(tmp_path):
    rows, cols = 4 * (MIN_BUDGET // 4) // 4096 + 37, 1024  # 4 KiB rows: over 4 blocks at the least budget
    torch.manual_seed(0)
    w = torch.randn(rows, cols)
    experts = torch.randn(2, 600, 8)
    save_file({"w": w, "experts": experts}, str(tmp_path / "model.safetensors"))
    index = tensor_index(tmp_path)
    with SliceReader(tmp_path, index, budget_bytes=0) as reader:  # the least budget: 4 MiB blocks
        out = torch.empty(rows - 5, cols)
        reader.read(Ref("w"), (5, 0), tuple(out.shape), out)
        assert torch.equal(out, w[5:])
        half = torch.empty(cols // 2, rows)  # moemesh holds the matrix transposed: [cols, rows]
        reader.read(Ref("w", transpose=True), (cols // 2, 0), tuple(half.shape), half)
        assert torch.equal(half, w[:, cols // 2 :].t())
        box = torch.empty(500, 8)
        reader.read(Ref("experts", expert=1, rows=(100, 600)), (0, 0), (500, 8), box)
        assert torch.equal(box, experts[1, 100:])
        assert reader.bytes_read == out.numel() * 4 + half.numel() * 4 + box.numel() * 4
