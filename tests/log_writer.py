"""Run as a subprocess by test_log: records batches in turns of a few events, commits each
turn and prints the committed seq, until it is killed."""

import sys
from pathlib import Path

from support import make_plan

from statemachine import events as ev
from statemachine.log import EventLog
from statemachine.store import Store

store = Store(EventLog(Path(sys.argv[1])))
for n in range(1_000_000):
    store.record(ev.BatchAccepted(make_plan(f"b{n}", frames=505)), now=float(n))
    store.record(ev.InstanceUp(f"i{n}"), now=float(n))
    store.commit()
    print(store.seq, flush=True)
