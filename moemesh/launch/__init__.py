"""Layer 5, launch: where ranks come from, and how a run starts and stops.

  env        which launcher started this process (torchrun, srun, deepspeed, none), its
             rank; stale launcher variables; ``--local_rank``; srun -> env:// variables
  checks     the cluster config against this process's environment; the outputs' umask
  signals    stop signals -> a stop request the training loop polls
  heartbeat  hang detection: file beats of spawned ranks, store beats under a launcher
  rank       one rank's life: device, process group, heartbeat, mesh -> train function
  spawn      bare ``python train.py``: spawn the local ranks, report failures, pass stops on
  run        ``run_ranks``: join the launcher's job, run one rank, or spawn
  slurm      SLURM policy for the ``cluster=slurm`` launcher plugin (allocations, requeue)
  context    ``RankContext``, what the training function receives

Launch takes the training function from its caller, as the function or by name (imported by
name where a rank runs it), and never names the trainer itself. This
``__init__`` imports only ``RankContext`` (no torch), so the login-node side (env, signals,
slurm) stays light.
"""

from moemesh.launch.context import RankContext

__all__ = ["RankContext"]
