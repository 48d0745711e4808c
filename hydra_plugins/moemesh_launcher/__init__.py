"""moemesh's Hydra launcher plugin (SLURM through submitit); see launcher.py."""
