"""Training loop, data, optimizer and schedule, metrics and loggers."""
