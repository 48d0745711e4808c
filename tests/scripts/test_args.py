"""scripts/_args.py: the scripts' shared argument types and one-line parser. A 0 was swapped for
the default (`--steps 0` trained 300 steps on 4 ranks; `--tokens 0` printed T=2048, exit 0) and
a negative size was a traceback."""

import pytest

from scripts import bench_kernels, bench_schedules_routing


@pytest.mark.parametrize(
    ("main", "argv", "says"),
    [
        (bench_schedules_routing.main, ["routing", "--steps", "0"], "argument --steps: 0 must be a positive integer"),
        (bench_schedules_routing.main, ["schedules", "--rounds", "-1"], "argument --rounds: -1 must be a positive"),
        (bench_kernels.main, ["--tokens", "0"], "argument --tokens: 0 must be a positive integer"),
        (bench_kernels.main, ["--hidden", "x"], "argument --hidden: 'x' is not a whole number"),
        (bench_kernels.main, ["--top-k", "100"], "--top-k=100 must be at most --experts=64"),
        (bench_kernels.main, ["--peak-gbps", "inf"], "argument --peak-gbps: inf must be a finite number > 0"),
    ],
)
def test_a_value_a_run_cannot_use_is_one_line_exit_2(main, argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and says in err[0], err


@pytest.mark.parametrize(
    ("script", "argv", "says"),
    [
        ("bench_comm", ["--iters", "0"], "argument --iters: 0 must be a positive integer"),
        ("bench_comm", ["--world", "-2"], "argument --world: -2 must be a positive integer"),
        ("suite_cpu", ["--top", "-1"], "argument --top: -1 must be a positive integer"),
        ("bench_hostile_checkpoint", ["--torch-n", "-1"], "argument --torch-n: -1 must be a finite number >= 0"),
        ("bench_hostile_checkpoint", ["--n", "nan"], "argument --n: nan must be a finite number > 0"),
        ("ab_bench", ["--before", "HEAD", "--rounds", "0"], "argument --rounds: 0 must be a positive integer"),
        ("bench_hf", ["--rounds", "0"], "argument --rounds: 0 must be a positive integer"),
        ("bench_data", ["--docs", "0"], "argument --docs: 0 must be a positive integer"),
        ("tune_kernels", ["--tokens", "0"], "argument --tokens: 0 must be a positive integer"),
    ],
)
def test_the_developer_scripts_refuse_a_count_they_cannot_use_in_one_line(script, argv, says, capsys):
    """0 or a negative count was a traceback after argparse's usage block, or a run of nothing."""
    import importlib

    module = importlib.import_module(f"scripts.{script}")
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and f": error: {says}" in err[0], err


@pytest.mark.parametrize("script", ["prepare_data", "plan", "mesh", "export_hf"])
def test_the_user_facing_scripts_say_an_argument_mistake_in_one_line(script, capsys):
    """argparse printed its usage block (2-5 lines) before the mistake."""
    import importlib

    module = importlib.import_module(f"scripts.{script}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--no-such-flag"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and ": error: " in err[0], err  # prog: error: ...
