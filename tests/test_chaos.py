"""The short crash suite: 30 daemon SIGKILLs and 5 server SIGKILLs over a multi-video
workload, judged by the servers' own execution records (bench/chaos.py has the long one)."""

from __future__ import annotations

import json

import chaos


def test_kills_lose_nothing_and_render_nothing_twice(tmp_path, capsys):
    code = chaos.main(["--kills", "30", "--server-kills", "5", "--seed", "7", "--json",
                       "--keep", str(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert result["kills"] == 30 and result["server_kills"] == 5, result
    assert result["duplicates"] == 0 and result["lost"] == 0, result
    assert result["batches_done"] == result["batches"] > 0, result
    assert code == 0
