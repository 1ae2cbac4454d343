"""The simulator's scratch directories go away with the simulator: after ``stop()``, after
``kill()`` then a teardown's ``stop()``, and, for a simulator process killed with SIGKILL,
when the next simulator starts."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from simulator import SCRATCH_PREFIX, start_simulator, sweep_orphans

REPO = Path(__file__).resolve().parent.parent


def test_stop_deletes_the_scratch_directory_but_not_the_given_ones(tmp_path: Path) -> None:
    sim = start_simulator(0, output_dir=tmp_path / "out")
    scratch = sim.scratch_dir
    assert (scratch / "temp").is_dir() and (scratch / "input").is_dir()
    sim.stop()
    assert not scratch.exists()
    assert (tmp_path / "out").is_dir()


def test_a_teardown_after_a_kill_still_deletes_it() -> None:
    with start_simulator(0) as sim:
        scratch = sim.scratch_dir
        sim.kill()
    assert not scratch.exists()


def test_a_stopped_simulator_starts_again_with_a_fresh_scratch_directory() -> None:
    sim = start_simulator(0)
    first = sim.scratch_dir
    sim.stop()
    sim.start()
    try:
        assert sim.scratch_dir != first and (sim.scratch_dir / "output").is_dir()
    finally:
        sim.stop()
    assert not sim.scratch_dir.exists()


def test_the_scratch_of_a_sigkilled_process_is_swept_by_the_next_simulator(tmp_path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--port", "0",
         "--output-dir", str(tmp_path / "out"), "--input-dir", str(tmp_path / "in")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in (process.stdout.readline() if process.stdout else "")
        prefix = f"{SCRATCH_PREFIX}{process.pid}-"
        mine = [p for p in Path(tempfile.gettempdir()).iterdir()
                if p.name.startswith(prefix)]
        assert len(mine) == 1
    finally:
        process.kill()
        process.wait()
    assert mine[0].exists()  # SIGKILL: nobody in that process could clean up
    assert mine[0] in sweep_orphans()
    assert not mine[0].exists()


def test_the_scratch_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-x"
    alive.mkdir()
    unknown = tmp_path / f"{SCRATCH_PREFIX}abc"  # no pid in the name: not ours to judge
    unknown.mkdir()
    assert sweep_orphans(tmp_path) == []
    assert alive.exists() and unknown.exists()
