"""moemesh entry point: compose the config, validate it, start the ranks, train.

    python train.py                               # tiny MoE, one process, CPU
    python train.py parallel=ep2_dp2              # spawns 4 local ranks
    torchrun --nproc_per_node=4 train.py parallel=ep2_dp2
    python train.py -m parallel=ep4,ep2_dp2,dp4   # a local sweep
    python train.py -m cluster=slurm parallel=ep8_dp2,ep2_dp8   # one SLURM job each
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from conf.schema import ConfigError, register_schema, to_run_config
from conf.validate import validate_run
from parallel.checkpoint import CheckpointError
from parallel.launch import check_launcher, detect_launcher_env, install_stop_handlers, launcher_rank, run_ranks
from parallel.slurm import TASK_MARKER
from trainer.data import prepare_data
from trainer.loop import train

register_schema()
# Under torchrun/srun every rank runs Hydra: only rank 0 gets the dated run directory,
# .hydra/ and the log file; the others resolve to harmless values (see conf/config.yaml).
OmegaConf.register_new_resolver(
    "moemesh_rank0", lambda if_rank0, otherwise=None: if_rank0 if launcher_rank() == 0 else otherwise, replace=True
)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    env = detect_launcher_env()
    if env is not None:
        # This process is one rank: a preemption or time-limit signal during start-up must
        # become a stop request too, not kill it (spawned ranks install theirs when they start).
        install_stop_handlers()
    try:
        run = to_run_config(cfg)
        dims = validate_run(run, env.world_size if env else None)
        check_launcher(run, env, dims)
        # A sweep started under torchrun/srun would run once per rank. The SLURM launcher's
        # own tasks are the exception: there each task is one rank of one sweep job.
        if env is not None and HydraConfig.get().mode == RunMode.MULTIRUN and not os.environ.get(TASK_MARKER):
            raise ConfigError(
                f"-m (multirun) under {env.kind}: every rank would run the sweep on its own; "
                "start sweeps from a plain shell (python train.py -m ...), which spawns each job's ranks, "
                "or submit them with python train.py -m cluster=slurm ..."
            )
        data_paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    except ConfigError as err:
        print(f"moemesh: config error: {err}", file=sys.stderr)
        sys.exit(2)
    output_dir = HydraConfig.get().runtime.output_dir
    hc = HydraConfig.get()
    if run.logger.group is None and hc.mode == RunMode.MULTIRUN:
        # A sweep's runs share a wandb group: the sweep directory, e.g. "2026-11-29/06-11-17".
        group = "/".join(Path(hc.sweep.dir).parts[-2:])
        run = dataclasses.replace(run, logger=dataclasses.replace(run.logger, group=group))
    try:
        summary = run_ranks(run, dims, env, output_dir, data_paths, train)
    except (FloatingPointError, CheckpointError) as err:  # training stopped for a reason it can name
        print(f"moemesh: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    if summary is None and launcher_rank() == 0:  # spawned ranks: read rank 0's summary back
        import json

        summary = json.loads((Path(output_dir) / "summary.json").read_text())
    return None if summary is None else summary.get("final_loss")


if __name__ == "__main__":
    main()
