"""The event-sourced heart of comfy-dual: plans, job and batch state machines, the event
log, the store that folds events into state, and the pure scheduler.

Nothing in here does network I/O or imports from ``spool``, ``instances`` or the CLIs.
"""
