"""The command line, checked before Hydra creates a directory or starts a rank.

``train.py`` calls :func:`preflight` with its argv. It composes every job the command
would run (a ``-m`` sweep expanded as Hydra's basic sweeper expands it), turns each into
the typed ``RunConfig`` and hands them back; any mistake becomes one ``ConfigError``
line instead of Hydra's multi-line report or a traceback. Hydra then runs the command
as usual, so a refused command leaves no run or sweep directory behind.

``HYDRA_FULL_ERROR=1`` re-raises Hydra's own exception with its full trace.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from moemesh.config.schema import (
    RunConfig,
    did_you_mean,
    explain_omegaconf,
    register_schema,
    schema_keys,
    to_run_config,
)
from moemesh.config.validate import check_layout_name, validate_run
from moemesh.errors import ConfigError
from moemesh.fields import Launcher

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the YAML groups Hydra composes


@dataclass(frozen=True)
class Job:
    overrides: tuple[str, ...]  # this job's command-line overrides (a sweep: one value per key)
    run: RunConfig
    sweeper: str | None  # the hydra/sweeper choice, if the command names one


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


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0]


def explain(err: BaseException) -> str:
    """One line for a composition failure: the key, the value, what would be valid."""
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        hint = did_you_mean(choice, err.options)
        return f"{group}={choice}: no such preset{hint} (valid: {', '.join(err.options)})"
    cause = err.__cause__ if isinstance(err, HydraException) and err.__cause__ is not None else err
    if isinstance(cause, OmegaConfBaseException):
        key = cause.full_key or getattr(cause, "key", "") or ""
        listed = re.search(r"(?:Could not override '|Error merging override )([\w.]+)", str(err))
        if listed and key and not key.startswith(listed.group(1)) and listed.group(1) in schema_keys():
            # A key inside the items of a list (data.sources=[{...}]): OmegaConf names only the item's key.
            if re.match(r"Key '.*' not in '", _first_line(cause.msg or str(cause))):
                return _unknown_item_key(listed.group(1), key)
            key = f"{listed.group(1)}[*].{key}"
        return explain_omegaconf(cause, overriding="Could not override" in str(err), key=key)
    text = _first_line(str(err))
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
    """Commands that only print (--help, --cfg, --info, completion) go straight to Hydra."""
    args, _ = _parse_argv(argv)
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


def preflight(argv: list[str], config_name: str = "config") -> Command:
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
            for overrides in expand(args.overrides, args.multirun):
                cfg = compose(name, overrides=overrides)
                try:
                    run = to_run_config(cfg, full_error=full)
                except ConfigError as err:
                    added = [o for o in overrides if o.startswith("+")]
                    unknown = "no such key" in str(err)  # composed, so a +key/++key added it
                    note = f" ({added[0]}: '+' cannot add keys to moemesh's config groups)" if added and unknown else ""
                    raise ConfigError(f"{err}{note}") from None
                jobs.append(Job(tuple(overrides), run, _choice(overrides, "hydra/sweeper")))
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        if full:
            raise
        raise ConfigError(explain(err)) from None
    finally:
        GlobalHydra.instance().clear()
    command = Command(multirun=args.multirun, jobs=jobs)
    check_jobs(command)
    return command


def compose_run(overrides: list[str]) -> RunConfig:
    """One job's typed config from key=value overrides, composed as ``python train.py`` composes it
    (for the command lines under scripts/: plan.py, calibrate.py, mesh.py); ConfigError, one line,
    on a mistake. Only the fields are checked: the caller validates what it needs."""
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            return to_run_config(compose("config", overrides=list(overrides)))
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(explain(err)) from None
    finally:
        GlobalHydra.instance().clear()


def refuse(err: ConfigError | str) -> NoReturn:
    """The one way a command line says a config mistake: one line on stderr, exit code 2."""
    print(f"moemesh: config error: {err}", file=sys.stderr)
    raise SystemExit(2)


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
