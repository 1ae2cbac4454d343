import sys
from pathlib import Path

import pytest
from hypothesis import Phase, settings

# the tests' helpers (support, fakes) and the benchmarks some tests run (chaos, replay)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
sys.path.insert(0, str(Path(__file__).parent))

import config
from simulator import SimConfig, start_simulator

# `pytest --hypothesis-profile=noshrink` reports a failure without minimising it: handy when
# checking that a planted bug is caught.
settings.register_profile("noshrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])

# Short simulated jobs: the end-to-end tests need many of them, not long ones.
SIM_DURATIONS = {"HIGH": 0.1, "LOW": 0.1, "COMBINE": 0.03}


@pytest.fixture
def sims():
    """Two simulated ComfyUI servers (for HIGH and for LOW) on free loopback ports."""
    with start_simulator(0, SimConfig(durations=SIM_DURATIONS)) as high, \
            start_simulator(0, SimConfig(durations=SIM_DURATIONS)) as low:
        yield high, low


@pytest.fixture(autouse=True)
def _no_status_page(monkeypatch):
    """Daemons started in this process serve no page unless a test sets WEB_ADDRESS:
    many run at once, and the default port would be taken by the first."""
    monkeypatch.setattr(config, "WEB_ADDRESS", "")
