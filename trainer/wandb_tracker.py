"""Weights & Biases: one run per training job, from rank 0, with the reduced metrics.

Imported only when ``logger=wandb``. Offline unless credentials are present
(WANDB_API_KEY or a netrc entry for the API host); WANDB_MODE, when set, wins.
Offline runs land in ``<run dir>/wandb/offline-run-*`` and upload later with
``wandb sync``. The dashboard groups by config columns: the layout's dp, ep, tp,
pp and world_size are top-level keys of the run config.
"""
from __future__ import annotations

import netrc
import os
import re
import secrets
from dataclasses import asdict
from pathlib import Path

import numpy as np

from conf.schema import RunConfig

_SECRET = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def flat_config(run: RunConfig, dims) -> dict:
    """The resolved config, flattened to dotted keys, without secrets, plus the layout columns."""
    out: dict = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif not _SECRET.search(prefix):
            out[prefix] = value

    walk("", asdict(run))
    out.update(dp=dims.dp, ep=dims.ep, tp=dims.tp, pp=dims.pp, world_size=dims.world_size,
               layout=run.parallel.name)
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


class WandbTracker:
    def __init__(self, run: RunConfig, dims, output_dir: str):
        import wandb

        self.wandb = wandb
        lg = run.logger
        mode = os.environ.get("WANDB_MODE") or ("online" if has_credentials() else "offline")
        # One wandb run per run directory: an attempt that resumes there (a requeued SLURM
        # job) continues the same wandb run instead of starting a second one.
        id_file = Path(output_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            project=lg.project,
            entity=lg.entity,
            group=lg.group,
            job_type=lg.job_type,
            name=run.parallel.name,
            config=flat_config(run, dims),
            dir=output_dir,
            mode=mode,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self._last_load: dict = {}

    def log(self, record: dict) -> None:
        data = _scalars({k: v for k, v in record.items() if k != "load"})
        for layer, st in record.get("load", {}).items():
            counts = np.asarray(st["tokens_per_expert"], dtype=np.float64)
            # Per-expert load as a histogram over expert ids (bin i holds expert i's tokens).
            data[f"load/{layer}/tokens_per_expert"] = self.wandb.Histogram(
                np_histogram=(counts, np.arange(len(counts) + 1, dtype=np.float64)))
            data.update(_scalars({k: v for k, v in st.items() if not isinstance(v, list)}, f"load/{layer}/"))
            self._last_load[layer] = st
        self.run.log(data, step=record["step"])

    def summary(self, summary: dict) -> None:
        self.run.summary.update(_scalars(summary))
        rows = [[layer, e, n, st["mean_score"][e]] for layer, st in self._last_load.items()
                for e, n in enumerate(st["tokens_per_expert"])]
        if rows:
            table = self.wandb.Table(columns=["layer", "expert", "tokens", "mean_score"], data=rows)
            self.run.log({"load/final_per_expert": table})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
