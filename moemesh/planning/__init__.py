"""The planner: what a DP x EP x TP x PP split holds and costs before any GPU hour is spent.

Torch-free (a test imports it with torch unimportable), so it plans on a laptop:

- ``memory``: what one rank of a pipeline stage holds (state exact, activations estimated);
- ``cost``: every valid split of ``cluster.gpus``, its communication and step time, ranked;
- ``calibration``: the constants that price a step (priors or fitted to measured runs);
- ``search``: the layout sweep's choice of candidates and its reading of the runs.

Command lines: ``scripts/plan.py``, ``scripts/calibrate.py``; the sweep: ``hydra/sweeper=layouts``.
"""
