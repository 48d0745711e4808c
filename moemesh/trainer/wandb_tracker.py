"""Weights & Biases: one run per training job, from rank 0, with the reduced metrics.

Imported only when ``logger=wandb``. Offline unless credentials are present
(WANDB_API_KEY or a netrc entry for the API host); WANDB_MODE, when set, wins.
Offline runs land in ``<run dir>/wandb/offline-run-*`` and upload later with
``wandb sync``. The dashboard groups by config columns: the layout's dp, ep, tp,
pp, world_size, sharding and activation_checkpointing are top-level keys of the run config.

Being offline never stops a run: an online start first checks that the server (or
the HTTPS proxy) accepts a connection within a few seconds, then gives wandb
``logger.init_timeout_s``; if either fails, or the key is refused, the run logs
offline and says so in one line (``note``), which the loop prints.
"""

from __future__ import annotations

import functools
import netrc
import os
import re
import secrets
import socket
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from moemesh.config.schema import RunConfig
from moemesh.errors import first_line
from moemesh.parallel.dims import layout_name
from moemesh.untrusted import read_bounded

# Every key the schema defines is a setting and is logged (model.pad_token_id and
# model.max_ranks_per_token hold "token" and are hyperparameters). A key the schema does not
# define sits in a free-form dict (cluster.slurm.additional_parameters) and is left out when any
# part of it looks like a credential's name: that test is broad, since such a dict can hold
# anything (apitoken, secretkey, bot_token, mypassword).
_CREDENTIAL = re.compile(r"key|token|secret|passw|passphrase|credential|auth|bearer|cookie", re.IGNORECASE)


# A value may hold a credential whatever its key (a cluster.slurm.setup line
# "export HF_TOKEN=hf_..."): an assignment to a credential-like name keeps its name and loses
# its value, and tokens of the well-known forms are replaced wherever they stand.
_ASSIGNED = re.compile(
    r"\b((?:[A-Za-z0-9]+[_-])*(?:API_?KEY|SECRET_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?))"
    r"(\s*[=:]\s*)"
    r"(\"[^\"]*\"|'[^']*'|\S+)",
    re.IGNORECASE,
)
_TOKEN_FORMS = re.compile(
    r"(?<![/\w.-])(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|glpat-[A-Za-z0-9_-]{20,})"
)
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """``value`` with what looks like a credential replaced (strings, and lists and dicts of them
    at any depth: a list of records, as data.sources, is logged as one value)."""
    if isinstance(value, str):
        value = _ASSIGNED.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", value)
        return _TOKEN_FORMS.sub(REDACTED, value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    return value


def is_secret_key(key: str) -> bool:
    """Whether the dotted config key ``key`` may name a credential (its value is never logged)."""
    if key in _schema_keys():
        return False
    return any(_CREDENTIAL.search(part) for part in key.split("."))


@functools.cache
def _schema_keys() -> frozenset[str]:
    from moemesh.config.schema import schema_keys

    return frozenset(schema_keys())


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


PROBE_S = 5.0  # a server that does not accept a TCP connection in this long is taken as unreachable


def _server_url() -> str:
    """Where wandb will connect: WANDB_BASE_URL, else the installed wandb's default."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    import wandb

    return wandb.Settings().base_url


def unreachable(url: str, timeout_s: float) -> str | None:
    """None if a TCP connection to ``url``'s host (or the HTTPS proxy, when one is set) opens
    within ``timeout_s``; else why not, in a few words. Name resolution has no timeout of its
    own, so the attempt runs in a thread that is abandoned when the time is up."""
    proxy = next(
        (os.environ[k] for k in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY") if os.environ.get(k)), None
    )
    target = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else url)
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or type(err).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    where = f"{'proxy ' if proxy else ''}{host}:{port}"
    if not outcome:
        return f"no connection to {where} within {timeout_s:g} s"
    return None if outcome[0] is None else f"cannot reach {where} ({outcome[0]})"


def key_problem() -> str | None:
    """What is wrong with WANDB_API_KEY's form, checked locally by wandb's own rule (None: looks
    valid, or unset, or this wandb has no such check); the server may still refuse it."""
    key = os.environ.get("WANDB_API_KEY")
    if key is None:
        return None
    try:
        from wandb.sdk.lib.wbauth.validation import check_api_key
    except ImportError:
        return None
    problem = check_api_key(key.strip())
    return f"WANDB_API_KEY is not a valid key ({problem.rstrip('.')})" if problem else None


def flat_config(run: RunConfig, dims) -> dict:
    """The resolved config, flattened to dotted keys, without secrets, plus the layout columns."""
    out: dict = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif not is_secret_key(prefix):
            out[prefix] = redact(value)

    walk("", asdict(run))
    out.update(dp=dims.dp, ep=dims.ep, tp=dims.tp, pp=dims.pp, world_size=dims.world_size, layout=layout_name(dims))
    # What each rank keeps and recomputes: a column to group by, beside the layout's.
    out.update(sharding=run.parallel.sharding, activation_checkpointing=run.trainer.activation_checkpointing)
    return out


def _scalars(record: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def _recorded_id(id_file: Path) -> str | None:
    """The wandb run id an earlier attempt recorded in ``id_file``: None without one, or where it
    is not one this tracker writes (8 hex digits; the file is read as untrusted)."""
    try:
        text = read_bounded(id_file, 64, error=ValueError).decode("ascii", "replace").strip()
    except ValueError:
        return None
    return text if re.fullmatch(r"[0-9a-f]{8}", text) else None


class WandbTracker:
    def __init__(self, run: RunConfig, dims, output_dir: str, *, resumed: bool = False):
        import wandb

        self.wandb = wandb
        self.note: str | None = None  # one line for the run's log when it fell back to offline
        lg = run.logger
        mode = os.environ.get("WANDB_MODE") or ("online" if has_credentials() else "offline")
        # An attempt that resumed from a checkpoint in its run directory (a requeued SLURM job)
        # continues the wandb run recorded there instead of starting a second one; a fresh run
        # gets a new id, even in a directory an earlier run used.
        id_file = Path(output_dir) / "wandb_run_id"
        run_id = _recorded_id(id_file) if resumed else None
        run_id = run_id or secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        args: dict[str, Any] = dict(  # wandb.init's keywords, common to both starts
            id=run_id,
            resume="allow",
            project=lg.wandb_project,
            entity=lg.entity,
            group=lg.group,
            job_type=lg.job_type,
            name=layout_name(dims),
            config=flat_config(run, dims),
            dir=output_dir,
        )
        wandb_run = None
        if mode == "online":
            why = key_problem() or unreachable(_server_url(), min(PROBE_S, lg.init_timeout_s))
            if why is None:
                try:
                    wandb_run = wandb.init(
                        mode="online",
                        settings=wandb.Settings(console="off", x_disable_stats=True, init_timeout=lg.init_timeout_s),
                        **args,
                    )
                except Exception as err:  # noqa: BLE001 - a refused key, a timeout, a server error: all mean offline
                    why = first_line(err)
                    wandb.teardown()  # the failed attempt still holds this run id in wandb's service
            if wandb_run is None:
                offline = Path(output_dir) / "wandb"
                self.note = (
                    f"wandb: {why}; logging offline to {offline} (upload later: wandb sync {offline}/offline-run-*)"
                )
                mode = "offline"
        if wandb_run is None:
            # WANDB_MODE goes to wandb as the user set it (wandb checks it); mypy wants one of its literals.
            wandb_run = wandb.init(
                mode=mode,  # type: ignore[arg-type]
                settings=wandb.Settings(console="off", x_disable_stats=True),
                **args,
            )
        self.run = wandb_run
        self._last_load: dict = {}

    def log(self, record: dict) -> None:
        data = _scalars({k: v for k, v in record.items() if k != "load"})
        for layer, st in record.get("load", {}).items():
            counts = np.asarray(st["tokens_per_expert"], dtype=np.float64)
            # Per-expert load as a histogram over expert ids (bin i holds expert i's tokens).
            data[f"load/{layer}/tokens_per_expert"] = self.wandb.Histogram(
                np_histogram=(counts, np.arange(len(counts) + 1, dtype=np.float64))
            )
            data.update(_scalars({k: v for k, v in st.items() if not isinstance(v, list)}, f"load/{layer}/"))
            self._last_load[layer] = st
        self.run.log(data, step=record["step"])

    def summary(self, summary: dict) -> None:
        """The run's numbers, and whether it ran to its end: a run a signal stopped (a SLURM
        requeue, a time limit) says which in ``stopped_by_signal`` (empty when it finished) and
        is marked preempting, so the dashboard does not show it as finished."""
        self.run.summary.update(_scalars(summary))
        stopped = summary.get("stopped_by_signal") or []
        self.run.summary["stopped_by_signal"] = ", ".join(stopped)
        if stopped:
            self.run.mark_preempting()
        rows = [
            [layer, e, n, st["mean_score"][e]]
            for layer, st in self._last_load.items()
            for e, n in enumerate(st["tokens_per_expert"])
        ]
        if rows:
            table = self.wandb.Table(columns=["layer", "expert", "tokens", "mean_score"], data=rows)
            self.run.log({"load/final_per_expert": table})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
