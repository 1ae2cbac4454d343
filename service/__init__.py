"""The daemon's parts: the single-writer loop, logging, the run summary."""
