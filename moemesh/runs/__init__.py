"""A run's outputs, read: the contract of metrics.jsonl and summary.json (``records``), the one
warm-up rule and the medians (``steady``), and run and sweep directories (``reader``).
Torch-free: the planner and the scripts read runs without it."""
