"""Memory a long run keeps for its metrics is bounded: records stream to metrics.jsonl and the
summary's medians come from a bounded, evenly spaced sample (every rank kept every record
before: 7.7 KB per step for the tiny model, 57 KB for the seed model, 5.3 GiB per rank after
100k steps)."""

import copy
import gc
import json
import statistics
import tracemalloc

import pytest
import torch

from moemesh.launch import RankContext
from moemesh.parallel.mesh import single_rank_mesh
from moemesh.runs.steady import StepSample, summarize_records
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import train
from moemesh.trainer.metrics import MetricsLogger
from moemesh.trainer.step_stats import RankTimes, ReducedStats, StepShape, stat_width, step_record
from tests.helpers import tiny_run


def _record(step: int, *, layers: int, experts: int) -> dict:
    """A record as the loop logs it (step_record on reduced statistics), for `layers` MoE layers."""
    E = experts
    stats = torch.rand(layers, stat_width(E), dtype=torch.float64) * 100
    shape = StepShape(
        tokens=4096,
        samples=16,
        num_experts=E,
        moe_layers=list(range(layers)),
        flops_per_token=1e6,
        peak_flops=1e12,
        world_size=4,
        loss_norm=4,
    )
    phase_s = 0.01 * (1 + (step * 7919 % 13) / 13)
    times = RankTimes(
        **dict.fromkeys(("forward", "backward", "pipeline", "grad_reduce", "optimizer"), phase_s),
        a2a_dispatch=phase_s,
        a2a_combine=phase_s,
        experts=phase_s,
        attention_core=phase_s,
        step=0.05 + (step * 104729 % 17) / 1000,
        bytes_sent=1e6 + step,
        bytes_recv=1e6,
        min_bytes=1e6,
        ratio=1.0,
    )
    reduced = ReducedStats(loss=2.0, aux_loss=0.01, z_loss=0.001, seq_aux_loss=0.0, rows=stats, num_experts=E)
    return step_record(step=step, lr=1e-3, grad_norm=1.0, stats=reduced, shape=shape, times=times, biases=None)


def _old_summary(records):
    """summarize_records before the sample: medians over every record after the first."""
    steady = records[1:] or records
    med = statistics.median
    return {
        "time_breakdown": {k: med([r["time"][k] for r in steady]) for k in steady[0]["time"]},
        "a2a_share": med([r["time"]["a2a"] / r["time"]["step"] for r in steady]),
        "a2a_bytes_sent_per_step": med([r["a2a"]["bytes_sent"] for r in steady]),
        "median_samples_per_s": med([r["samples_per_s"] for r in steady]),
        "median_flops_per_s": med([r["flops_per_s"] for r in steady]),
        "mfu": med([r["mfu"] for r in steady]),
        "load_cv_final": {layer: v["cv"] for layer, v in records[-1]["load"].items()},
    }


@pytest.mark.parametrize("n", [1, 2, 3, 50, 4097])
def test_medians_are_exact_up_to_the_capacity(n):
    template = _record(1, layers=2, experts=8)
    records = []
    for i in range(1, n + 1):
        r = copy.deepcopy(template)
        r["time"]["step"] = r["step_s"] = 0.05 + (i * 7919 % 101) / 1000
        r["samples_per_s"] = 16 / r["step_s"]
        records.append(r)
    sample = StepSample()
    for r in records:
        sample.add(r)
    got = sample.summary()
    assert got.pop("median_over_steps") == max(n - 1, 1)
    assert got == _old_summary(records) and summarize_records(records) == sample.summary()


def test_past_capacity_the_sample_spans_the_run_evenly():
    sample = StepSample(capacity=8)
    for i in range(1, 101):  # record 1 is the warm-up; steady records 0..98
        sample.add(
            {
                "step": i,
                "time": {"step": float(i), "a2a": 0.0},
                "a2a": {"bytes_sent": 0},
                "samples_per_s": 1.0,
                "flops_per_s": 1.0,
                "mfu": None,
            }
        )
    kept = list(sample.columns[0])
    assert sample.stride == 16 and kept == [float(i) for i in range(2, 101, 16)]  # every 16th, first to last
    assert len(kept) < 8 and sample.summary()["mfu"] is None


def _traced_growth_per_1000(logger, make, n, first):
    """Bytes of Python memory retained per 1,000 records logged, between record `first` and `n`:
    what was allocated under this file's loop (a thread left by an earlier test in the same worker
    process allocates too, and is not counted)."""
    ours = [tracemalloc.Filter(True, __file__, all_frames=True)]  # what this thread's loop allocated

    def held():
        return sum(t.size for t in tracemalloc.take_snapshot().filter_traces(ours).traces)

    tracemalloc.start(6)  # deep enough that every allocation of the loop has this file in its stack
    try:
        for i in range(1, n + 1):
            logger.log(make(i))
            if i == first:
                gc.collect()
                at_first = held()
        gc.collect()
        return (held() - at_first) / (n - first) * 1000
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # one process, seconds: the fast tier keeps its 90 s bound
@pytest.mark.shares_cores
def test_a_rank_without_the_file_keeps_bounded_memory_for_seed_model_records(tmp_path):
    """Ranks other than 0 write nothing; they kept every record. Seed model: 16 MoE layers, 64
    experts."""
    text = json.dumps(_record(1, layers=16, experts=64))
    assert len(text) > 15_000  # about 20 KB of json, 57 KB as Python objects

    def make(i):
        r = json.loads(text)  # a record of its own, as the loop makes one per step
        r["step"], r["time"]["step"] = i, 0.05 + (i % 17) / 1000
        return r

    # A small sample, so that it is full within the test (the default's bound: the test below).
    logger = MetricsLogger(str(tmp_path), enabled=False, console=False, jsonl=True, total_steps=400, sample_capacity=32)
    growth = _traced_growth_per_1000(logger, make, 400, 150)
    assert growth < 16 * 1024, f"{growth / 1024:.0f} KiB per 1,000 steps"  # it was about 57 MB


def test_the_default_sample_holds_at_most_4096_steps_of_a_few_floats():
    sample = StepSample()
    record = _record(1, layers=1, experts=2)
    for _ in range(1, 20_001):
        sample.add(record)
    columns = sample.columns
    assert 2048 <= len(sample) <= 4096 and len(columns) == 17
    assert sum(c.buffer_info()[1] * c.itemsize for c in columns) <= 4096 * 17 * 8  # 0.5 MiB at most, any run length


@pytest.mark.slow  # seconds of one process: shares the cores with the slow tier
@pytest.mark.shares_cores
def test_rank_0_streams_every_record_to_the_file_and_keeps_bounded_memory(tmp_path):
    template = _record(1, layers=4, experts=8)

    def make(i):
        r = copy.deepcopy(template)
        r["step"] = i
        return r

    # A small sample, full within the test (the default's bound: the test above).
    logger = MetricsLogger(
        str(tmp_path), enabled=True, console=False, jsonl=True, total_steps=1_500, sample_capacity=256
    )
    logger.begin(0)
    growth = _traced_growth_per_1000(logger, make, 1_500, 500)
    logger.close()
    assert growth < 256 * 1024, f"{growth / 1024:.0f} KiB per 1,000 steps"  # the sample fills to its capacity
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1_500 and json.loads(lines[-1])["step"] == 1_500


def test_a_resume_keeps_the_earlier_steps_records_streaming_them_not_reading_the_file_whole(tmp_path):
    """A requeued run's metrics.jsonl held every step before; it was read whole into memory (800 MB
    of history took 2 GB). It is streamed now, and what is not a record of an earlier step (a later
    step, a line cut short, a list, a 2 MiB line) is left out."""
    path = tmp_path / "metrics.jsonl"
    pad = "p" * 100
    lines = [json.dumps({"step": i, "loss": 5.0 - i / 1e5, "pad": pad}) for i in range(1, 100_001)]
    junk = ["[1, 2]", '{"step": "7"}', "x" * (8 << 20), '{"step": 150, "loss": 1.']
    path.write_text("\n".join(lines[:100] + junk + lines[100:]) + "\n")
    size = path.stat().st_size
    logger = MetricsLogger(str(tmp_path), enabled=True, console=False, jsonl=True, total_steps=200_000)
    tracemalloc.start()
    logger.begin(60_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    logger.close()
    kept = path.read_text().splitlines()
    assert kept == lines[:60_000]
    # A few of the 1 MiB pieces the long line is skipped in, not the file (28 MiB) or that line (8 MiB).
    assert peak < 6 << 20 and size > 4 * peak, (peak, size)
    assert not list(tmp_path.glob(".metrics.jsonl.tmp"))


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_training_run_retains_little_per_step(tmp_path):
    """The loop itself, tiny model, every step logged: Python memory retained from step 200 to
    600, per 1,000 steps (it was several MB: one record per step on every rank)."""
    steps = 600
    run = tiny_run(
        **{
            "trainer.steps": steps,
            "trainer.log_every": 1,
            "checkpoint.save_final": False,
            "model.num_experts": 16,
            "trainer.global_batch_size": 2,
            "trainer.seq_len": 8,
            "model.max_seq_len": 8,
        }
    )
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    seen, traced = [0], {}

    def each_step():  # the loop asks once per step whether to stop: a hook at a step boundary
        seen[0] += 1
        if seen[0] == 100:
            tracemalloc.start()
        if seen[0] in (200, steps - 1):
            gc.collect()
            traced[seen[0]] = tracemalloc.get_traced_memory()[0]
        return False

    torch.set_num_threads(1)
    try:
        summary = train(
            run,
            RankContext(
                rank=0,
                local_rank=0,
                device=torch.device("cpu"),
                mesh=single_rank_mesh(),
                output_dir=str(tmp_path),
                data_paths=paths,
                stop_requested=each_step,
            ),
        )
    finally:
        tracemalloc.stop()
    growth = (traced[steps - 1] - traced[200]) / (steps - 1 - 200) * 1000
    assert growth < 1024 * 1024, f"{growth / 1024:.0f} KiB per 1,000 steps"
    assert summary["steps"] == steps and summary["median_over_steps"] == steps - 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == steps
    assert summary["median_tokens_per_s"] == pytest.approx(2 * 8 / summary["median_step_s"])


def test_the_one_warm_up_rule_is_the_same_in_every_reader(tmp_path):
    """summary.json's medians (StepSample, online), the run reader's (offline, from metrics.jsonl)
    and the layout sweeper's measure() take the same steps: the last attempt's logged steps after
    the first, skipped steps left out."""
    from moemesh.planning.search import measure
    from moemesh.runs.reader import load_run
    from moemesh.runs.steady import WARMUP_RECORDS, steady

    records = []
    for i in range(1, 9):
        r = _record(i, layers=1, experts=4)
        r["time"]["step"] = r["step_s"] = float(i)
        if i == 5:
            r["skipped"] = True
        records.append(r)
    # A resumed attempt: steps 1-3 came from the first attempt, this one started at step 3.
    sample = StepSample(warmup=WARMUP_RECORDS)
    for r in records[3:]:
        sample.add(r)
    kept = [r["step"] for r in steady(records, start_step=3)]
    assert kept == [6, 7, 8]  # 4 is the attempt's warm-up, 5 was skipped
    assert sample.summary()["time_breakdown"]["step"] == 7.0 and len(sample) == 3
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"start_step": 3, "final_loss": 2.0}))
    run = load_run(tmp_path)
    assert [r["step"] for r in run.steady] == kept
    assert run.medians()["time_breakdown"]["step"] == 7.0
    assert measure(tmp_path).step_s == 7.0 and measure(tmp_path).timed_steps == 3


def test_an_odd_capacity_still_keeps_evenly_spaced_steps():
    """After halving, the step that filled the sample is kept only on the doubled spacing."""
    sample = StepSample(capacity=5, warmup=0)
    for i in range(40):
        sample.add(
            {
                "step": i + 1,
                "time": {"step": float(i), "a2a": 0.0},
                "a2a": {"bytes_sent": 0},
                "samples_per_s": 1.0,
                "flops_per_s": 1.0,
                "mfu": None,
            }
        )
    kept = [int(v) for v in sample.columns[0]]
    assert kept == list(range(0, kept[-1] + 1, sample.stride)), (kept, sample.stride)


def test_durations_print_as_hours_minutes_seconds():
    from moemesh.trainer.metrics import _fmt_duration

    assert _fmt_duration(3725) == "1:02:05" and _fmt_duration(59) == "0:00:59" and _fmt_duration(-3) == "0:00:00"


def test_the_progress_line_says_step_loss_lr_tokens_and_eta_and_train_log_keeps_the_due_ones(tmp_path, monkeypatch):
    """Off a terminal, train.log gets the first step, the last one, and one line per 5 s between
    them; each says the step of the total, the loss, the learning rate, tokens per second and the
    time left at the pace so far, after a bar of 20 cells."""
    import types

    from moemesh.trainer import metrics

    clock = iter([0.0, 2.0, 6.0, 20.0, 80.0])  # the logger's start, then one reading per logged step
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    logger = MetricsLogger(str(tmp_path), enabled=True, console=False, jsonl=False, total_steps=40)
    for step in (1, 2, 10, 40):
        record = _record(step, layers=1, experts=4)
        record.update(loss=2.5, lr=3e-4, tokens_per_s=12_345.0)
        if step == 40:
            record["val_loss"] = 2.25
        logger.log(record)
    logger.close()
    assert (tmp_path / "train.log").read_text().splitlines() == [
        "[....................] step     1/40 | loss 2.5000 | lr 3.00e-04 | 12,345 tok/s | ETA 0:01:18",
        "[#####...............] step    10/40 | loss 2.5000 | lr 3.00e-04 | 12,345 tok/s | ETA 0:01:00",
        "[####################] step    40/40 | loss 2.5000 | lr 3.00e-04 | 12,345 tok/s | ETA 0:00:00 | val 2.2500",
    ]


def test_a_resume_ends_a_last_record_cut_before_its_newline_so_the_next_record_starts_a_line(tmp_path):
    """An attempt killed between a record and its newline leaves the file without a final
    newline; the resumed attempt keeps that record and appends the next one on a line of its own."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}')
    logger = MetricsLogger(str(tmp_path), enabled=True, console=False, jsonl=True, total_steps=4)
    logger.begin(2)
    logger.log(_record(3, layers=1, experts=4))
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_record_of_exactly_the_longest_line_is_kept_and_so_is_the_next(tmp_path):
    """A line of 1 MiB before its newline is a record (only a longer one is skipped), and
    skipping never takes the line after it."""
    from moemesh.trainer.metrics import _MAX_RECORD

    head = '{"step": 2, "pad": "'
    longest = head + "p" * (_MAX_RECORD - len(head) - 2) + '"}'
    assert len(longest) == _MAX_RECORD
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n' + longest + '\n{"step": 3}\n')
    logger = MetricsLogger(str(tmp_path), enabled=True, console=False, jsonl=True, total_steps=4)
    logger.begin(3)
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_run_of_one_timed_step_takes_its_medians_from_that_step():
    """Where the warm-up leaves no steady step, the warm-up records are the steady ones: summary.json
    (StepSample) and compare.py (steady) both show the one step, not nothing."""
    from moemesh.runs.steady import steady

    only = {"step": 1, "time": {"step": 2.0}}
    assert steady([only]) == [only]
    assert steady([only, {"step": 2, "time": {"step": 3.0}, "skipped": True}]) == [only]
    assert steady([{"step": 1, "loss": 3.0}]) == []  # no timed record: nothing to take medians of


def test_offline_medians_of_an_even_number_of_steps_average_the_middle_two(tmp_path):
    """Run.medians keeps every steady step (warm-up already left out): four steps' median is the
    mean of the middle two, over all four."""
    from moemesh.runs.reader import load_run

    records = [
        {
            "step": i,
            "time": {"step": s, "a2a": 0.0},
            "a2a": {"bytes_sent": 0},
            "samples_per_s": 1 / s,
            "flops_per_s": 1.0,
        }
        for i, s in enumerate([9.0, 1.0, 2.0, 4.0, 8.0], 1)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"start_step": 0}))
    medians = load_run(tmp_path).medians()
    assert medians["time_breakdown"]["step"] == 3.0 and medians["median_over_steps"] == 4
    assert medians["median_samples_per_s"] == (1 / 2 + 1 / 4) / 2
