"""The reading order: every window once per epoch on any number of data ranks, a new order each
epoch, mixtures by their weights, uint32 ids as written, and a position that resumes exactly."""

import numpy as np
import pytest
import torch

from moemesh.config.batch import BatchPlan
from moemesh.data import DataConfig, DataSourceConfig, TokenData, prepare_data
from moemesh.data.sampler import MIX_BLOCK, Mixture, permute
from tests.data._corpus import write_corpus

SEQ = 16
VOCAB = 1 << 20  # ids above 65,535: uint32 shards


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Three shards of documents of uneven lengths; every token id distinct (its position)."""
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    shards = [rng.integers(1, 60, size=k).tolist() for k in (90, 70, 110)]
    return write_corpus(tmp_path / "c", shards, vocab_size=VOCAB, start=70000)


def _data(path, **kw):
    cfg = DataConfig(name="t", kind="tokens", path=str(path), **kw)
    return TokenData(prepare_data(cfg, seq_len=SEQ, vocab_size=VOCAB), seed=7)


def _read_epoch(data, *, data_size, accum, global_batch, steps):
    """What every data rank reads over ``steps`` steps, in the loop's own slicing."""
    micro = global_batch // (data_size * accum)
    rows = []
    for step in range(steps):
        for rank in range(data_size):
            for i in range(accum):
                start = BatchPlan(global_batch, SEQ, accum, micro, data_size).micro_start(i, rank)
                x, y = data.batch("train", step, global_batch=global_batch, seq_len=SEQ, start=start, count=micro)
                assert torch.equal(x[:, 1:], y[:, :-1])
                rows.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("data_size, accum", [(1, 1), (4, 1), (4, 2)])
def test_every_token_is_read_once_per_epoch_on_any_number_of_data_ranks(corpus, data_size, accum):
    data = _data(corpus, prefetch_steps=0)
    train = data.train.astype(np.int64)
    (windows,) = data.windows("train", SEQ)
    assert windows == (len(train) - 1) // SEQ and train.max() > 65535  # uint32 ids, read as written
    G = 8 * data_size
    steps = windows // G  # whole steps inside epoch 0
    rows = _read_epoch(data, data_size=data_size, accum=accum, global_batch=G, steps=steps)
    inputs = rows[:, :-1].flatten().numpy()
    # Each window is tokens [w*SEQ, w*SEQ+SEQ]: ids are positions + 70000, so the input ids name
    # the windows read; none twice, and every one of them is in the training documents.
    assert len(np.unique(inputs)) == len(inputs) == steps * G * SEQ
    assert set(inputs.tolist()) <= set(train[: windows * SEQ].tolist())
    # The whole epoch, sample by sample: every window exactly once.
    _, epoch, w = data.locate("train", np.arange(windows), SEQ)
    assert (epoch == 0).all() and sorted(w.tolist()) == list(range(windows))
    _, epoch, w2 = data.locate("train", np.arange(windows, 2 * windows), SEQ)
    assert (epoch == 1).all() and sorted(w2.tolist()) == list(range(windows)) and w2.tolist() != w.tolist()


def test_validation_documents_never_train(corpus):
    data = _data(corpus)
    train, val = set(data.train.tolist()), set(data.val.tolist())
    assert val and not train & val
    # Held out: whole documents, at the end of each shard (the last 1% of its tokens start them).
    x, _ = data.batch("val", 0, global_batch=4, seq_len=SEQ, start=0, count=4)
    assert set(x.flatten().tolist()) <= val


def test_every_layout_reads_the_same_global_batch(corpus):
    data = _data(corpus)
    whole = data.batch("train", 3, global_batch=16, seq_len=SEQ, start=0, count=16)[0]
    for data_size, accum in [(2, 1), (4, 2), (16, 1)]:
        micro = 16 // (data_size * accum)
        parts = {}
        for rank in range(data_size):
            for i in range(accum):
                start = BatchPlan(16, SEQ, accum, micro, data_size).micro_start(i, rank)
                parts[start] = data.batch("train", 3, global_batch=16, seq_len=SEQ, start=start, count=micro)[0]
        assert torch.equal(torch.cat([parts[s] for s in sorted(parts)]), whole)


def test_permutation_is_a_bijection_for_any_size():
    for n in [1, 2, 3, 5, 64, 65, 1000, 4097, 65537]:
        for key in (0, 1, 2**63):
            assert sorted(permute(np.arange(n), n, key).tolist()) == list(range(n))


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (1.0, 3.0, 0.01)])
def test_mixture_shares_are_exact_per_block_and_within_1pct_over_batches(weights):
    mix = Mixture.of(weights)
    share = np.asarray(weights) / sum(weights)
    assert sum(mix.counts) == MIX_BLOCK and np.allclose(np.asarray(mix.counts) / MIX_BLOCK, share, atol=1 / MIX_BLOCK)
    # Over 300 batches of 16 samples, and over any 20 consecutive batches, each share is within 1%.
    source, k = mix.locate(np.arange(300 * 16))
    assert np.allclose(np.bincount(source, minlength=len(weights)) / len(source), share, atol=0.01)
    for start in range(0, 300 * 16 - 320, 320):
        window = source[start : start + 320]
        assert np.allclose(np.bincount(window, minlength=len(weights)) / 320, share, atol=0.01 + 1 / 320)
    # Each source's own samples are 0, 1, 2, ... in order: none skipped, none repeated.
    for s in range(len(weights)):
        assert k[source == s].tolist() == list(range(int((source == s).sum())))
    assert mix.drawn(len(source)) == np.bincount(source, minlength=len(weights)).tolist()


def test_a_mixture_of_prepared_directories_reads_each_by_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    a = write_corpus(tmp_path / "a", [[40] * 50], vocab_size=VOCAB, start=0)
    b = write_corpus(tmp_path / "b", [[40] * 50], vocab_size=VOCAB, start=500_000)
    cfg = DataConfig(
        name="t",
        kind="tokens",
        sources=[DataSourceConfig(str(a), 0.7), DataSourceConfig(str(b), 0.3)],
        val_fraction=0.05,  # 1% of 50 documents is none: each holds out its last few
    )
    data = TokenData(prepare_data(cfg, seq_len=SEQ, vocab_size=VOCAB), seed=1)
    x = torch.cat([data.batch("train", s, global_batch=16, seq_len=SEQ, start=0, count=16)[0] for s in range(100)])
    from_b = (x[:, 0] >= 500_000).float().mean().item()
    assert from_b == pytest.approx(0.3, abs=0.01)
    pos = data.position(100, global_batch=16, seq_len=SEQ)
    assert [s["samples"] for s in pos["sources"]] == [1600 - round(from_b * 1600), round(from_b * 1600)]
    assert pos["sources"][0]["epoch"] >= 1  # a small source goes round again, in a new order
    for src in pos["sources"]:
        assert divmod(src["samples"], src["windows"]) == (src["epoch"], src["window_in_epoch"])


def test_weights_that_draw_the_same_order_resume_and_other_weights_do_not(tmp_path, monkeypatch):
    """Weights 0.7/0.3 and 7/3 draw the same samples, but the fingerprint held the weights as
    given: the rescaled mixture was refused as "other data". It holds the samples per block now;
    a checkpoint's fingerprint of the old form is still accepted."""
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    a = write_corpus(tmp_path / "a", [[40] * 20], vocab_size=VOCAB, start=0)
    b = write_corpus(tmp_path / "b", [[40] * 20], vocab_size=VOCAB, start=500_000)

    def mixture(wa, wb):
        cfg = DataConfig(name="t", kind="tokens", sources=[DataSourceConfig(str(a), wa), DataSourceConfig(str(b), wb)])
        return TokenData(prepare_data(cfg, seq_len=SEQ, vocab_size=VOCAB), seed=1)

    first, rescaled, other = mixture(0.7, 0.3), mixture(7, 3), mixture(0.6, 0.4)
    pos = first.position(5, global_batch=8, seq_len=SEQ)
    assert rescaled.check_position(pos, seq_len=SEQ) is None
    assert "trained on other data" in other.check_position(pos, seq_len=SEQ)
    legacy = {**pos, "fingerprint": first.spec.fingerprint(seed=1, seq_len=SEQ, legacy=True)}
    assert first.check_position(legacy, seq_len=SEQ) is None  # a checkpoint saved before the change
    rescaled.resume_at(5, pos, seq_len=SEQ)
    kw = dict(global_batch=8, seq_len=SEQ, start=0, count=8)
    assert torch.equal(rescaled.batch("train", 5, **kw)[0], first.batch("train", 5, **kw)[0])


def test_a_position_resumes_the_same_batches_also_with_another_global_batch(corpus):
    a = _data(corpus)
    run = [a.batch("train", s, global_batch=8, seq_len=SEQ, start=0, count=8)[0] for s in range(10)]
    pos = a.position(6, global_batch=8, seq_len=SEQ)
    b = _data(corpus)
    b.resume_at(6, pos, seq_len=SEQ)
    assert all(
        torch.equal(b.batch("train", s, global_batch=8, seq_len=SEQ, start=0, count=8)[0], run[s]) for s in (6, 7, 8, 9)
    )
    # Twice the global batch from step 6 on: steps 6 and 7 of the old run are step 6 of the new one.
    c = _data(corpus)
    c.resume_at(6, pos, seq_len=SEQ)
    assert torch.equal(c.batch("train", 6, global_batch=16, seq_len=SEQ, start=0, count=16)[0], torch.cat(run[6:8]))
    # Another seq_len (or corpus, or seed) is other data: the position is refused, in one line.
    why = b.check_position(pos, seq_len=SEQ * 2)
    assert why and "trained on other data" in why and "\n" not in why


def test_read_ahead_gives_the_same_batches(corpus):
    ahead, plain = _data(corpus, prefetch_steps=2), _data(corpus, prefetch_steps=0)
    for s in range(6):
        for start in (0, 4):
            kw = dict(global_batch=8, seq_len=SEQ, start=start, count=4)
            got, want = ahead.micro_batch("train", s, **kw), plain.micro_batch("train", s, **kw)
            assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)
    ahead.close()


def test_document_numbers_follow_the_index(corpus):
    data = _data(corpus, document_mask=True)
    b = data.micro_batch("train", 0, global_batch=8, seq_len=SEQ, start=0, count=8)
    assert b.documents is not None and b.documents.shape == b.inputs.shape
    # A document number changes exactly where a document of the index starts.
    from moemesh.data.format import read_meta

    meta = read_meta(corpus)
    offsets = [np.fromfile(corpus / s.index_file, dtype=np.uint64) for s in meta.shards]
    starts = set()
    base = 70000
    for s, off in zip(meta.shards, offsets):
        starts |= {base + int(o) for o in off[:-1]}
        base += s.n_tokens
    for x, d in zip(b.inputs.tolist(), b.documents.tolist()):
        for j in range(1, SEQ):
            assert (d[j] != d[j - 1]) == (x[j] in starts)


def test_the_slots_left_over_go_to_the_largest_remainders():
    """Weights 1:1:1 give 1365.33 each of 4096: one slot is left, and it goes to the first source
    (ties: the earlier). 0.5:0.3:0.2 give 2048, 1228.8, 819.2: the one slot left goes to source 1
    (remainder .8), not to the smallest remainder."""
    assert Mixture.of([1, 1, 1]).counts == (1366, 1365, 1365)
    assert Mixture.of([0.5, 0.3, 0.2]).counts == (2048, 1229, 819)


def test_the_held_out_cut_takes_the_fewest_whole_documents_that_hold_the_fraction():
    """Documents of 10 tokens at 0, 10, ..., 90: 15 % of 100 tokens is 15, so the last two
    documents (from 80) are held out; 10 % is exactly the last one; a cut is always a
    document's start."""
    from moemesh.data.reader import held_out_cut

    offsets = np.arange(0, 100, 10, dtype=np.uint64)
    assert held_out_cut(offsets, 100, 0.15) == 80
    assert held_out_cut(offsets, 100, 0.10) == 90
    assert held_out_cut(offsets, 100, 0.101) == 80  # 10.1 tokens: one document is not enough
    assert held_out_cut(offsets, 100, 0.0) == 100
    assert held_out_cut(np.asarray([0, 100], dtype=np.uint64), 100, 0.5) == 100  # one document: it trains


def test_a_source_too_light_for_one_sample_per_block_is_refused():
    with pytest.raises(ValueError, match=f"a source would get no sample in {MIX_BLOCK}"):
        Mixture.of([1.0, 1e-5])


def test_documents_of_neighbouring_shards_have_different_numbers(tmp_path):
    """A stream runs from one shard into the next: the last document of one and the first of the
    next are two documents (data.document_mask must not let one attend to the other)."""
    from moemesh.data.reader import _tokens_streams

    out = write_corpus(tmp_path / "c", [[5, 5], [5, 5], [5]], vocab_size=1000)
    train, _ = _tokens_streams(str(out), 0.0, 0)
    d = train.documents(0, 25).tolist()
    runs = [d[i] for i in range(25) if i == 0 or d[i] != d[i - 1]]
    assert len(runs) == len(set(runs)) == 5 and [len(set(d[i : i + 5])) for i in range(0, 25, 5)] == [1] * 5


def test_a_token_id_equal_to_the_vocab_size_is_refused_when_read(tmp_path):
    """The metadata's vocabulary is checked before any rank starts; the ids themselves as they are
    read (a corpus whose metadata understates its vocabulary)."""
    from moemesh.data.reader import DataSpec, SourceSpec
    from moemesh.errors import DataError

    out = write_corpus(tmp_path / "c", [[49]], vocab_size=1000)  # ids 0..48: one window of seq_len 48
    src = (SourceSpec("c", "tokens", str(out)),)
    kw = dict(global_batch=1, seq_len=48, start=0, count=1)
    x, y = TokenData(DataSpec("tokens", src, None, 0.01, 49), seed=0).batch("train", 0, **kw)
    assert int(y.max()) == 48
    with pytest.raises(DataError, match=r"token id 48 in the train data of c >= model.vocab_size=48"):
        TokenData(DataSpec("tokens", src, None, 0.01, 48), seed=0).batch("train", 0, **kw)


def test_a_position_from_another_seed_or_validation_fraction_is_refused(corpus):
    """Either changes which windows train in which order: the position would mean nothing."""
    pos = _data(corpus).position(6, global_batch=8, seq_len=SEQ)
    assert _data(corpus).check_position(pos, seq_len=SEQ) is None
    other_seed = TokenData(_data(corpus).spec, seed=8)
    assert "trained on other data" in other_seed.check_position(pos, seq_len=SEQ)
    assert "trained on other data" in _data(corpus, val_fraction=0.2).check_position(pos, seq_len=SEQ)


def test_with_a_validation_directory_every_training_document_trains(tmp_path, monkeypatch):
    """data.val_path holds out nothing of the training source: its last documents train too
    (a source of exactly one window's tokens is enough)."""
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    a = write_corpus(tmp_path / "a", [[10, 7]], vocab_size=VOCAB)
    v = write_corpus(tmp_path / "v", [[17]], vocab_size=VOCAB, start=500)
    cfg = DataConfig(name="t", kind="tokens", path=str(a), val_path=str(v))
    data = TokenData(prepare_data(cfg, seq_len=SEQ, vocab_size=VOCAB), seed=0)
    assert data.train.tolist() == list(range(17)) and data.val.tolist() == list(range(500, 517))
