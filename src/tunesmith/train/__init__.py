"""The training loop, its loss, batching, metrics and the run folder it writes."""
