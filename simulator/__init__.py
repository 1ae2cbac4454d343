"""A ComfyUI-API-compatible simulator: in-process (``start_simulator``: tests and
``daemon.py --simulate``) or as a process (``python -m simulator --port 8188``).

Routes, status codes, bodies and websocket messages follow ComfyUI and the recorded
answers of a real server. No node computes: a job sleeps for the duration of its kind and
its output nodes write small but valid files. Needs aiohttp, as ComfyUI itself does; the
production daemon never imports this package.
"""

from simulator.config import PROGRESS_NODES, Faults, SimConfig
from simulator.handle import SimulatorHandle, start_simulator
from simulator.scratch import SCRATCH_PREFIX, sweep_orphans
from simulator.worker import read_ledger

__all__ = ["PROGRESS_NODES", "SCRATCH_PREFIX", "Faults", "SimConfig", "SimulatorHandle",
           "read_ledger", "start_simulator", "sweep_orphans"]
