"""parallel/tp.token_sequences: which batch row (sequence) each token a TP rank holds belongs to,
for the sequence-wise balance loss. Without sequence parallelism a rank holds a contiguous slice
of the flattened batch; with it, a slice of every sequence."""

import pytest
import torch

from moemesh.moe.layer import weighted_balance_loss
from moemesh.moe.router import RouterLosses
from moemesh.parallel import tp


@pytest.mark.parametrize("rank", [0, 1])
def test_each_tp_rank_names_the_sequences_it_holds(rank, monkeypatch):
    monkeypatch.setattr(tp, "_rank", lambda group: rank)
    monkeypatch.setattr(tp, "group_size", lambda group: 2)
    # B=2 sequences of S=8: without SP the 16 flattened tokens split 8 / 8, so rank 0 holds
    # sequence 0 and rank 1 sequence 1 (a micro-batch of 4 sequences: 0-1 and 2-3)
    seq, full = tp.token_sequences(8, 8, "tp", sequence_parallel=False)
    assert seq.tolist() == [rank] * 8 and full == 8
    seq, _ = tp.token_sequences(16, 8, "tp", sequence_parallel=False)
    assert seq.tolist() == [2 * rank] * 8 + [2 * rank + 1] * 8
    # with SP each rank holds S/2 = 4 tokens of each sequence
    seq, full = tp.token_sequences(8, 4, "tp", sequence_parallel=True)
    assert seq.tolist() == [0] * 4 + [1] * 4 and full == 8


def test_each_balance_loss_takes_its_own_factor():
    from moemesh.moe.config import ModelConfig

    cfg = ModelConfig(
        name="t", hidden_size=16, num_experts=4, top_k=2, moe_ffn_hidden_size=8,
        aux_loss_factor=0.01, z_loss_factor=0.001, seq_aux_loss_factor=0.5,
    )  # fmt: skip
    one = torch.tensor(1.0)
    losses = RouterLosses(aux_loss=one, z_loss=2 * one, global_counts_E=torch.zeros(4), seq_aux_loss=4 * one)
    assert weighted_balance_loss(cfg, losses).item() == pytest.approx(0.01 + 0.002 + 2.0)
