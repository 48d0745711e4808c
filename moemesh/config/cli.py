"""The command line, checked before Hydra creates a directory or starts a rank.

``train.py`` calls :func:`preflight` with its argv. It composes every job the command
would run (a ``-m`` sweep expanded as Hydra's basic sweeper expands it), turns each into
the typed ``RunConfig`` and hands them back; any mistake becomes one ``ConfigError``
line instead of Hydra's multi-line report or a traceback. Hydra then runs the command
as usual, so a refused command leaves no run or sweep directory behind.

``HYDRA_FULL_ERROR=1`` re-raises Hydra's own exception with its full trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import stat
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

from moemesh.config.schema import (
    RunConfig,
    bool_value_error,
    did_you_mean,
    explain_omegaconf,
    register_schema,
    schema_keys,
    to_run_config,
)
from moemesh.config.validate import check_layout_name, validate_run
from moemesh.errors import ConfigError, first_line
from moemesh.fields import Launcher

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the YAML groups Hydra composes


@dataclass(frozen=True)
class Job:
    overrides: tuple[str, ...]  # this job's command-line overrides (a sweep: one value per key)
    run: RunConfig
    sweeper: str | None  # the hydra/sweeper choice, if the command names one
    # (key, path) of the directory Hydra will create for it: hydra.run.dir, or under -m
    # hydra.sweep.dir (and the job's own subdirectory); None where it cannot be known here
    output: tuple[str, str] | None = None
    job_dir: str | None = None


@dataclass(frozen=True)
class Command:
    multirun: bool
    jobs: list[Job]


def _unknown_item_key(target: str, key: str) -> str:
    """A misspelled key inside the items of a list of dataclasses (``data.sources=[{...}]``)."""
    cls: Any = RunConfig
    for part in target.split("."):
        cls = typing.get_type_hints(cls)[part]
    items = [a for arg in typing.get_args(cls) for a in (arg, *typing.get_args(arg)) if dataclasses.is_dataclass(a)]
    valid = [f.name for f in dataclasses.fields(items[0])] if items else []
    return f"{target}: an item has no key {key}{did_you_mean(key, valid)} (valid keys of an item: {', '.join(valid)})"


def explain(err: BaseException) -> str:
    """One line for a composition failure: the key, the value, what would be valid."""
    if isinstance(err, yaml.YAMLError):  # a config file that is not plain YAML (a !!python tag, a syntax error)
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
        problem = getattr(err, "problem", None) or first_line(str(err))
        return f"{where}: {problem} (moemesh reads its configs as plain YAML: no !!python tags)"
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        # Hydra lists the top group's presets even for a subdirectory (cluster=calibrated/x): list that one's.
        sub_dir = "/" in group and (CONF_DIR / group).is_dir()  # not Hydra's own hydra/sweeper
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if sub_dir else err.options
        hint = did_you_mean(choice, options)
        top, _, sub = group.partition("/")
        given = f"{top}={sub}/{choice}" if sub_dir else f"{group}={choice}"
        return f"{given}: no such preset{hint} (valid: {', '.join(options) or 'none yet'})"
    inside = re.match(r"In '([\w/.-]+)': \w+ raised while composing config", first_line(str(err)))
    if inside and isinstance(err.__context__, OmegaConfBaseException):
        # A key or value inside a group's YAML file (conf/parallel/x.yaml): Hydra's first line
        # names only the file; OmegaConf's error, the key, is the exception it was handling.
        found = err.__context__
        return f"{CONF_DIR / inside.group(1)}.yaml: {explain_omegaconf(found, key=found.full_key or '')}"
    cause = err.__cause__ if isinstance(err, HydraException) and err.__cause__ is not None else err
    if isinstance(cause, OmegaConfBaseException):
        key = cause.full_key or getattr(cause, "key", "") or ""
        listed = re.search(r"(?:Could not override '|Error merging override )([\w.]+)", str(err))
        if listed and key and not key.startswith(listed.group(1)) and listed.group(1) in schema_keys():
            # A key inside the items of a list (data.sources=[{...}]): OmegaConf names only the item's key.
            if re.match(r"Key '.*' not in '", first_line(cause.msg or str(cause))):
                return _unknown_item_key(listed.group(1), key)
            key = f"{listed.group(1)}[*].{key}"
        return explain_omegaconf(cause, overriding="Could not override" in str(err), key=key)
    text = first_line(str(err))
    ambiguous = re.match(r"Ambiguous value for argument '(.*)'$", text)
    if ambiguous:  # Hydra's second line says what to do; one line must say it
        return (
            f"{ambiguous.group(1)}: a comma makes a sweep: add -m to run one job per value, "
            "or write a list as key=[a,b]"
        )
    if text.startswith("LexerNoViableAltException: "):  # a character the override grammar has no token for
        override = text.split(": ", 1)[1]
        return (
            f"cannot parse the override: {override} (a value with characters such as > < or spaces needs quotes, "
            """e.g. 'hydra.sweeper.include=["ep>=2"]'; see --help)"""
        )
    if "mismatched input" in text or "no viable alternative" in text or "extraneous input" in text:
        return f"cannot parse the override: {text} (form: key=value, group=preset, +key=value; see --help)"
    return text


def _parse_argv(argv: list[str]):
    args, unknown = get_args_parser().parse_known_args(argv)
    return args, unknown


def needs_preflight(argv: list[str]) -> bool:
    """Commands that only print (--help, --cfg, --info, completion) go straight to Hydra, but
    not with -m, which Hydra refuses with a traceback: one line here instead."""
    args, _ = _parse_argv(argv)
    printing = next((flag for flag, on in (("--cfg", args.cfg), ("--info", args.info)) if on), None)
    if args.multirun and printing:
        raise ConfigError(f"{printing} prints one job's config, not a sweep's: drop -m (one value per key)")
    return not (
        args.help
        or args.hydra_help
        or args.cfg
        or args.info
        or args.shell_completion
        or args.experimental_rerun
        or args.config_dir
        or args.config_path
    )


def _choice(overrides: list[str], group: str) -> str | None:
    for o in overrides:
        name, _, value = o.lstrip("+~").partition("=")
        if name == group:
            return value
    return None


def repeated_keys(overrides: list[str]) -> list[str]:
    """A warning for each key the command line sets more than once to different values: Hydra
    takes the last without a word, which in a long command is rarely what was meant."""
    given: dict[str, list[str]] = {}
    for o in overrides:
        if "=" in o and not o.startswith("~"):
            key, _, value = o.lstrip("+").partition("=")
            given.setdefault(key, []).append(value)
    return [
        f"{key} is given {len(values)} times ({', '.join(values)}): the last, {key}={values[-1]}, is used"
        for key, values in given.items()
        if len(set(values)) > 1
    ]


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The jobs a command runs: one, or the cartesian product of a sweep's values."""
    if not multirun:
        return [list(overrides)]
    parsed = OverridesParser.create().parse_overrides(overrides)
    if _choice(overrides, "hydra/sweeper") not in (None, "basic"):
        # Another sweeper (e.g. the layout search) makes its own jobs: check the base command.
        return [[f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed if not o.is_sweep_override()]]
    [batch] = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return batch


def _check_overrides(overrides: list[str]) -> None:
    """What composing would take wrongly or hang on, before it runs (overrides parsed once)."""
    for text in overrides:
        if "=" not in text and not text.startswith("~"):  # Hydra's words: "Error parsing override"
            raise ConfigError(
                f"{text}: an override is key=value (e.g. trainer.steps=100); python train.py --help lists the keys"
            )
    parsed = OverridesParser.create().parse_overrides(overrides)
    _check_deletes(parsed)
    _check_bools(parsed)
    _check_presets(parsed)


def _check_deletes(parsed: list) -> None:
    """``~key``: every moemesh key is backed by the schema, which cannot lose one (OmegaConf's words:
    "TrainerConfig (DictConfig) does not support deletion"); Hydra's own keys are Hydra's."""
    for o in parsed:
        key = o.key_or_group
        if not o.is_delete() or key.split(".")[0].split("/")[0] == "hydra":
            continue
        if "." not in key and (CONF_DIR / key).is_dir():
            raise ConfigError(f"~{key}: a config group cannot be removed; choose one of its presets ({key}=<preset>)")
        raise ConfigError(f"~{key}: moemesh's config keys cannot be removed; set a value instead ({key}=...)")


def _check_bools(parsed: list) -> None:
    """A number other than 0/1 for a true-or-false key, which OmegaConf would take as true."""
    for o in parsed:
        if not o.is_delete():
            error = bool_value_error(o.key_or_group.lstrip("+"), o.value())
            if error:
                raise ConfigError(error)


MAX_PRESET_BYTES = 1 << 20


def _check_presets(parsed: list) -> None:
    """A calibrated cluster preset is written by scripts/calibrate.py and copied between clusters:
    read it as untrusted (bounded, no YAML aliases, which composing would expand: 600 bytes of
    nested aliases hung it) before Hydra composes it."""
    from moemesh.untrusted import YamlAliasError, read_bounded, yaml_without_aliases

    for o in parsed:
        value = o.value()
        if o.is_delete() or o.key_or_group.lstrip("+") != "cluster" or not isinstance(value, str):
            continue
        path = CONF_DIR / "cluster" / f"{value}.yaml"
        if not value.startswith("calibrated/") or not path.is_file():
            continue  # the project's own presets; a missing one is Hydra's to name
        try:
            yaml_without_aliases(read_bounded(path, MAX_PRESET_BYTES, f"cluster={value}"))
        except YamlAliasError as err:
            line = err.problem_mark.line + 1 if err.problem_mark else "?"
            raise ConfigError(
                f"cluster={value}: {path}, line {line}: {err.problem}, a calibrated preset has none; write it "
                "again with scripts/calibrate.py --name ... --force"
            ) from None
        except (yaml.YAMLError, RecursionError):
            continue  # any other mistake is Hydra's to meet, and explain()'s to name


def preflight(argv: list[str], config_name: str = "config", *, launched: bool = False) -> Command:
    """Compose and type every job of this command; raise ConfigError on the first mistake."""
    args, unknown = _parse_argv(argv)
    if unknown:
        raise ConfigError(
            f"unrecognized argument {unknown[0]}: give overrides as key=value (see python train.py --help)"
        )
    name = args.config_name or config_name
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    jobs = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            for i, overrides in enumerate(expand(args.overrides, args.multirun)):
                _check_overrides(overrides)
                cfg = compose(name, overrides=overrides, return_hydra_config=True)
                output, job_dir = _output_dirs(cfg, args.multirun, i)
                with open_dict(cfg):
                    cfg.pop("hydra")
                try:
                    run = to_run_config(cfg, full_error=full)
                except ConfigError as err:
                    added = [o for o in overrides if o.startswith("+")]
                    unknown = "no such key" in str(err)  # composed, so a +key/++key added it
                    note = f" ({added[0]}: '+' cannot add keys to moemesh's config groups)" if added and unknown else ""
                    raise ConfigError(f"{err}{note}") from None
                jobs.append(Job(tuple(overrides), run, _choice(overrides, "hydra/sweeper"), output, job_dir))
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        if full:
            raise
        raise ConfigError(explain(err)) from None
    finally:
        GlobalHydra.instance().clear()
    command = Command(multirun=args.multirun, jobs=jobs)
    check_jobs(command)
    check_output_dirs(command, launched=launched)
    return command


def compose_run(overrides: list[str]) -> RunConfig:
    """One job's typed config from key=value overrides, composed as ``python train.py`` composes it
    (for the command lines under scripts/: plan.py, calibrate.py, mesh.py); ConfigError, one line,
    on a mistake. Only the fields are checked: the caller validates what it needs."""
    register_schema()
    GlobalHydra.instance().clear()
    try:
        _check_overrides(list(overrides))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            return to_run_config(compose("config", overrides=list(overrides)))
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        raise ConfigError(explain(err)) from None
    finally:
        GlobalHydra.instance().clear()


def refuse(err: ConfigError | str) -> NoReturn:
    """The one way a command line says a config mistake: one line on stderr, exit code 2."""
    print(f"moemesh: config error: {hide_env(str(err))}", file=sys.stderr)
    raise SystemExit(2)


_ENV_REF = re.compile(r"oc\.env:\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)")


def hide_env(message: str, argv: list[str] | None = None) -> str:
    """``message`` with the value of every environment variable that an ``${oc.env:NAME}`` of the
    command line (``argv``, default sys.argv) or of a config file names replaced by that
    interpolation's text: a config error may quote a value, and such a value may be a secret
    (stderr ends in SLURM .err files and CI logs). A value of fewer than 4 characters is
    replaced only where it stands alone, so that digits of the message stay."""
    texts = list(sys.argv[1:] if argv is None else argv)
    for f in sorted(CONF_DIR.rglob("*.yaml")):
        with contextlib.suppress(OSError):
            if f.is_file() and f.stat().st_size <= 1 << 20:
                texts.append(f.read_text(errors="replace"))
    names = {m.group(1) for t in texts for m in _ENV_REF.finditer(t)}
    for name in sorted(names, key=lambda n: -len(os.environ.get(n, ""))):  # longest first: no partial leftovers
        value = os.environ.get(name, "")
        if not value.strip():
            continue
        pattern = re.escape(value) if len(value) >= 4 else rf"(?<![\w.]){re.escape(value)}(?![\w.])"
        message = re.sub(pattern, f"${{oc.env:{name}}}", message)  # no backslash: taken as is
    return message


def parallel_presets() -> set[str]:
    return {p.stem for p in (CONF_DIR / "parallel").glob("*.yaml")}


def check_jobs(command: Command) -> None:
    """What only the command line can check, for every job that validates (train.py reports
    the others): the preset's name against its (overridden) degrees."""
    presets = parallel_presets()
    for i, job in enumerate(command.jobs):
        try:
            dims = validate_run(job.run)
        except ConfigError:
            continue
        try:
            check_layout_name(job.run, dims, presets)
        except ConfigError as err:
            if not command.multirun:
                raise
            verb = "submitted" if job.run.cluster.launcher == Launcher.slurm else "run"
            raise ConfigError(f"nothing was {verb}; job #{i} ({' '.join(job.overrides)}): {err}") from None


# --- the directories the command will create -------------------------------------------------


def _output_dirs(cfg, multirun: bool, index: int) -> tuple[tuple[str, str] | None, str | None]:
    """(key, path) of the directory Hydra creates for this job (hydra.run.dir, or hydra.sweep.dir
    under -m) and the job's own directory (a sweep's: ``hydra.sweep.subdir`` under it, job
    number ``index``); None where the config cannot say before Hydra runs."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        root = str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
    except Exception:  # noqa: BLE001 - a resolver only train.py registers, say: Hydra reports it later
        return None, None
    if not root.strip():  # Hydra would take "" as the current directory: a run written into the repo
        raise ConfigError(f"{key} is empty; give the directory the run writes (or leave it out for outputs/...)")
    if not multirun:
        return (key, root), root
    try:
        with open_dict(cfg):
            cfg.hydra.job.num = index
            cfg.hydra.job.id = index
        return (key, root), str(Path(root) / str(cfg.hydra.sweep.subdir))
    except Exception:  # noqa: BLE001 - as above
        return (key, root), None


def _errno_text(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, "?")
    return f"[Errno {err.errno} {name}] {err.strerror or os.strerror(err.errno or 0)}"


def probe_dir(path: Path) -> str | None:
    """Why ``path`` cannot be the directory of a run, or None: it is created (with its missing
    parents) and a file written in it, then whatever this made is removed again. Each rank of
    a torchrun/srun launch probes the same directory at the same moment, so a directory
    another rank made first is not an error, and ENOENT (another rank removed what it had
    made, under this probe) is asked again a few times: a path that takes no new entries
    (/proc/x) answers ENOENT every time."""
    problem = None
    for _ in range(5):
        problem, raced = _probe_once(path)
        if not raced:
            break
        time.sleep(0.01)
    return problem


def _probe_once(path: Path) -> tuple[str | None, bool]:
    """(why not, or None; whether the answer was ENOENT, which a concurrent prober can cause)."""
    made: list[Path] = []
    probe = None
    try:
        missing = []
        p = path
        while not p.exists() and not p.is_symlink() and p != p.parent:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue  # made by another rank between the look and the mkdir: not ours to remove
            made.append(d)
        if not path.is_dir():
            try:  # one look: another rank may remove and make it again between two
                mode = path.lstat().st_mode
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)) from None
            if stat.S_ISDIR(mode):  # made again by another rank after is_dir() looked: ask again
                return _errno_text(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))), True
            return (
                f"[Errno {errno.ENOTDIR} ENOTDIR] {os.strerror(errno.ENOTDIR)} (it exists and is not a directory)",
                False,
            )
        probe = path / f".moemesh-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as err:
        return _errno_text(err), err.errno == errno.ENOENT
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                probe.unlink()
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()  # fails (and stays) where another rank's probe is inside it
    return None, False


def _probe_outputs(command: Command) -> None:
    """check_output_dirs' probes. A checkpoint.dir that cannot be written is found here, not by
    the ranks once the model is built."""
    probed = set()
    for job in command.jobs:
        c = job.run.checkpoint
        targets = [job.output] if job.output is not None else []
        if c.dir is not None and (c.every > 0 or c.save_final):
            targets.append(("checkpoint.dir", c.dir))
        for key, path in targets:
            if (key, path) in probed:
                continue
            probed.add((key, path))
            problem = probe_dir(Path(path))
            if problem:
                raise ConfigError(f"{key}={path}: cannot be created and written: {problem}")


def check_output_dirs(command: Command, *, launched: bool = False) -> None:
    """Before Hydra creates anything: the command's run or sweep directory, and a job's own
    checkpoint.dir where it saves, can be created and written (a probe, removed again); and,
    where this process starts every rank (not ``launched`` by torchrun/srun/deepspeed), no
    fresh run saves into a directory that holds another run's checkpoints (under a launcher
    each rank's Checkpointer refuses it before step 1 instead, once a requeued attempt has set
    its resume)."""
    _probe_outputs(command)
    for i, job in enumerate(command.jobs):
        problem = _run_dir_blocked(job, command.multirun)
        if problem:
            raise ConfigError(f"job #{i} ({' '.join(job.overrides)}): {problem}" if command.multirun else problem)
    if launched:
        return
    for i, job in enumerate(command.jobs):
        where = f"job #{i} ({' '.join(job.overrides)}): " if command.multirun else ""
        run, c = job.run, job.run.checkpoint
        if run.resume is not None or not (c.every > 0 or c.save_final) or job.sweeper not in (None, "basic"):
            continue  # resumes, never saves, or a sweeper that makes its own jobs (and resumes them)
        if c.dir is None and job.job_dir is None:
            continue
        root = Path(c.dir) if c.dir else Path(str(job.job_dir)) / "checkpoints"
        if not root.exists():
            continue  # nothing saved there yet (no torch import: train.py starts the fork server before it)
        from moemesh.parallel.checkpoint import owner_conflict

        fix = f"{'hydra.sweep.dir' if command.multirun else 'hydra.run.dir'}=<new dir>, or checkpoint.dir=<new dir>"
        conflict = owner_conflict(root, fix)
        if conflict:
            raise ConfigError(f"{where}{conflict}")
    for i, job in enumerate(command.jobs):
        problem = _overwrites_a_run(job, command.multirun)
        if problem:
            raise ConfigError(f"job #{i} ({' '.join(job.overrides)}): {problem}" if command.multirun else problem)


_RECORD_FILES = ("metrics.jsonl", "summary.json", "train.log")  # what rank 0 writes in the run directory


def _run_dir_blocked(job: Job, multirun: bool) -> str | None:
    """Why rank 0 could not write the run's records in its directory: one of their names is
    taken by something that is not a file (a directory, a socket), which rank 0 would find only
    once the model is built, or for summary.json only after the last step; or the default
    checkpoint directory's name by something that is not a directory."""
    if job.job_dir is None or job.sweeper not in (None, "basic"):
        return None
    run_dir = Path(str(job.job_dir))
    given = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    c, checkpoints = job.run.checkpoint, run_dir / "checkpoints"
    saves = c.every > 0 or c.save_final
    if c.dir is None and saves and (checkpoints.exists() or checkpoints.is_symlink()) and not checkpoints.is_dir():
        return (
            f"{checkpoints} is not a directory, and the run saves its checkpoints there; move it away, or use "
            f"{given}=<new dir> or checkpoint.dir=<dir>"
        )
    for name in _RECORD_FILES:
        path = run_dir / name
        try:
            mode = path.stat().st_mode  # a link to a file is a file
        except FileNotFoundError:
            continue
        except OSError as err:
            return f"{path}: cannot be read: {_errno_text(err)}"
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            fix = f"move it away or use {given}=<new dir>"
            return f"{path} is {kind}, and the run writes a file of that name there; {fix}"
    return None


def _overwrites_a_run(job: Job, multirun: bool) -> str | None:
    """What a job would lose by starting where another run's records are: a run that starts its
    records anew (fresh, or resume=auto with nothing to resume there) rewrites the run directory's
    metrics.jsonl and summary.json, and one resumed from a checkpoint elsewhere mixes its records
    with them; a run resumed from an older checkpoint saves beside newer ones, which resume=auto
    (a requeue, the printed resume line) would take."""
    if job.job_dir is None or job.sweeper not in (None, "basic"):
        return None
    run, run_dir, c = job.run, Path(str(job.job_dir)), job.run.checkpoint
    given = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    root = Path(c.dir) if c.dir else run_dir / "checkpoints"
    records = [name for name in ("metrics.jsonl", "summary.json") if _nonempty_file(run_dir / name)]
    if not records and run.resume in (None, "auto"):
        return None
    from moemesh.parallel.checkpoint import complete_checkpoints, resolve, step_of  # torch: only when needed

    own = complete_checkpoints(root)
    chosen = resolve(run.resume, Path(run.resume)) if run.resume not in (None, "auto") else []
    if records:
        held = f"{run_dir} holds another run's {' and '.join(records)}"
        if run.resume is None or (run.resume == "auto" and not own):
            more = ", or resume=auto to continue that run" if own else ""
            return f"{held}, which this run would overwrite; use {given}=<new dir>{more}"
        if chosen and chosen[0].parent.resolve() != root.resolve():
            return (
                f"{held}: resume={run.resume} continues another run's checkpoint, whose records would mix with "
                f"them; use {given}=<new dir>"
            )
    step = step_of(chosen[0]) if chosen else None
    newer = [p for p in own if step is not None and (step_of(p) or 0) > step]
    if newer and (c.every > 0 or c.save_final):
        return (
            f"resume={run.resume} is step {step}, but {root} holds {newer[-1].name}, newer: this run would save "
            f"beside it, and resume=auto (a requeue, a stopped run's resume line) would take it instead; save "
            f"this run elsewhere with checkpoint.dir=<new dir> (or move the newer checkpoints away)"
        )
    return None


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False
