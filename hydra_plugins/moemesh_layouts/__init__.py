"""moemesh's layout sweeper (``hydra/sweeper=layouts``); see sweeper.py."""
