"""Servers misbehaving: a render that hangs, and a server answering HTTP 500 for a while.
Neither may lose a job, render one twice, or wedge the daemon."""

from __future__ import annotations

import itertools
import threading
from collections import Counter

from support import logged, wait_for
from test_end_to_end import prompt_file, run, settings_for

import daemon
from instances.client import ComfyClient
from statemachine.errors import ServerError
from statemachine.log import EventLog
from statemachine.store import read_records


def run_while(action, settings, files) -> daemon.RunResult:
    """Run the files to the end while ``action`` misbehaves a server on another thread."""
    thread = threading.Thread(target=action)
    thread.start()
    try:
        return daemon.run_files(settings, files, daemon.Stop())
    finally:
        thread.join()


def events(state, type_: str | None = None) -> list:
    return [r.event for r in read_records(EventLog(state))
            if type_ is None or r.event.type == type_]


def hang_until_the_first_interrupt(monkeypatch, sim) -> None:
    """Renders on ``sim`` hang until the daemon interrupts one: from then on they run
    (the knob is cleared as the interrupt is sent, so the retry cannot hang too)."""
    sim.set_faults(hang=True)
    interrupt = ComfyClient.interrupt

    def interrupt_and_unhang(client, prompt_id):
        if client.base_url == sim.url:
            sim.set_faults(hang=False)
        return interrupt(client, prompt_id)

    monkeypatch.setattr(ComfyClient, "interrupt", interrupt_and_unhang)


def test_a_hung_render_is_interrupted_after_job_timeout_and_retried(tmp_path, sims,
                                                                     monkeypatch):
    high, low = sims
    hang_until_the_first_interrupt(monkeypatch, high)
    # 20 times a render's length: only the hung render can reach it (the exact deadline is
    # tests/test_loop.py's, on a fake clock)
    settings = settings_for(tmp_path / "state", high.port, low.port, JOB_TIMEOUT=2.0)
    result = run(settings, [prompt_file(tmp_path, "hangs", 101)])
    assert result.all_done
    first = [r for r in high.executions() if r["job_id"] == "b0001/H1"]
    assert [r["status"] for r in first] == ["interrupted", "success"]
    failures = events(tmp_path / "state", "job_attempt_failed")
    assert len(failures) == 1 and "JOB_TIMEOUT" in failures[0].error


def test_http_500_for_a_while_delays_but_uses_no_attempt_and_runs_nothing_twice(
        tmp_path, sims, monkeypatch):
    """The LOW server starts answering 500 just as the first LOW job is posted to it, and
    goes on until that POST was refused, the daemon has marked the server down and a
    probe of its health was refused too (the probe must see it fail to see it recover)."""
    high, low = sims
    state = tmp_path / "state"
    post_refused, probe_refused = threading.Event(), threading.Event()
    submit, system_stats = ComfyClient.submit, ComfyClient.system_stats
    first_post = threading.Lock()

    def break_low_on_its_first_post(client, *args, **kwargs):
        if client.base_url != low.url or not first_post.acquire(blocking=False):
            return submit(client, *args, **kwargs)
        low.set_faults(http_500=True)  # this POST /prompt and every GET get a 500
        try:
            return submit(client, *args, **kwargs)
        except ServerError:
            post_refused.set()
            raise

    def probe(client, *args, **kwargs):
        try:
            return system_stats(client, *args, **kwargs)
        except ServerError:
            if client.base_url == low.url and post_refused.is_set():
                probe_refused.set()
            raise

    def mend_low_once_seen_down():
        wait_for(first_post.locked, "a POST to the LOW server", timeout=60)
        try:
            wait_for(post_refused.is_set, "the POST refused", timeout=60)
            wait_for(lambda: [e for e in logged(state, "instance_down")
                              if e.instance_id == "low_priority"],
                     "the LOW server marked down", timeout=60)
            wait_for(probe_refused.is_set, "a probe of the LOW server refused", timeout=60)
        finally:
            low.set_faults(http_500=False)

    monkeypatch.setattr(ComfyClient, "submit", break_low_on_its_first_post)
    monkeypatch.setattr(ComfyClient, "system_stats", probe)
    settings = settings_for(state, high.port, low.port, FALLBACK=False)
    result = run_while(mend_low_once_seen_down, settings, [prompt_file(tmp_path, "flaky", 303)])
    assert result.all_done and post_refused.is_set()
    types = [e.type for e in events(state)]
    assert "job_attempt_failed" not in types and "job_failed" not in types
    assert [e for e in events(state, "instance_down") if e.instance_id == "low_priority"]
    assert set(high.counts().values()) == {1} and set(low.counts().values()) == {1}


def test_jobs_of_a_server_gone_for_instance_lost_timeout_move_to_another(tmp_path, sims):
    high, low = sims
    low.set_faults(hang=True)  # the LOW job is still running when the server dies

    def kill_low_mid_job():
        wait_for(lambda: low.executions(), "a LOW job running")
        low.kill()  # and it never comes back

    settings = settings_for(tmp_path / "state", high.port, low.port, INSTANCE_LOST_TIMEOUT=0.5)
    result = run_while(kill_low_mid_job, settings, [prompt_file(tmp_path, "moves", 202)])
    assert result.all_done
    lost = events(tmp_path / "state", "job_lost")
    assert lost and "low_priority unreachable" in lost[0].reason
    assert any(r["kind"] == "LOW" and r["status"] == "success" for r in high.executions())


def test_prompts_left_on_a_server_while_it_was_unreachable_never_run_there(tmp_path, sims):
    """A render hangs on the HIGH server with another prompt queued behind it; the server
    stops answering, its jobs move to the other server, and it comes back with both
    prompts still there. They are withdrawn (deleted, interrupted) before it gets new
    work: nothing renders twice and the server is not stuck behind the hung prompt."""
    high, low = sims
    high.set_faults(hang=True)
    state = tmp_path / "state"

    def unreachable_then_back():
        wait_for(lambda: ComfyClient(high.url).queue().pending, "a prompt behind the hung one")
        high.set_faults(response_delay=2.0)  # probes time out: DOWN
        wait_for(lambda: b'"job_lost"' in (state / "events.jsonl").read_bytes(),
                 "the jobs moved off the silent server")
        high.set_faults(response_delay=0.0, hang=False)

    settings = settings_for(state, high.port, low.port, INSTANCE_LOST_TIMEOUT=0.5,
                            REQUEST_TIMEOUT=0.5, FALLBACK=False)  # HIGH jobs wait for it
    result = run_while(unreachable_then_back, settings,
                       [prompt_file(tmp_path, "first", 101), prompt_file(tmp_path, "second", 101)])
    assert result.all_done
    runs = [r for sim in sims for r in sim.executions()]
    done = Counter(r["job_id"] for r in runs if r["status"] == "success")
    assert set(done.values()) == {1} and len(done) == 6
    lost = {e.prompt_id for e in events(state, "job_lost")}
    assert len(lost) == 2
    assert not [r for r in high.executions() if r["prompt_id"] in lost
                and r["status"] == "success"]
    after_loss = list(itertools.dropwhile(lambda e: e.type != "job_lost", events(state)))
    order = [e.type for e in after_loss if e.type == "prompts_withdrawn" or (
        e.type == "job_dispatch_intent" and e.instance_id == "high_priority")]
    assert order[0] == "prompts_withdrawn" and "job_dispatch_intent" in order
    assert {p for e in after_loss if e.type == "prompts_withdrawn" for p in e.prompt_ids} \
        >= lost


def successes_once(sims) -> bool:
    done = Counter(r["job_id"] for sim in sims for r in sim.executions()
                   if r["status"] == "success")
    return set(done.values()) == {1}


def test_a_job_queued_behind_a_hung_render_is_reconsidered_and_the_server_recovers(
        tmp_path, sims, monkeypatch):
    high, low = sims
    hang_until_the_first_interrupt(monkeypatch, high)
    state = tmp_path / "state"
    settings = settings_for(state, high.port, low.port, JOB_TIMEOUT=1.5, QUEUE_TIMEOUT=0.5,
                            FALLBACK=False)
    result = run(settings, [prompt_file(tmp_path, "first", 101),
                            prompt_file(tmp_path, "second", 101)])
    assert result.all_done and successes_once(sims)
    assert any("QUEUE_TIMEOUT" in e.reason for e in events(state, "job_lost"))
    assert any("JOB_TIMEOUT" in e.error for e in events(state, "job_attempt_failed"))


def test_a_server_that_ignores_interrupts_is_sick_and_its_jobs_move(tmp_path, sims):
    high, low = sims
    high.set_faults(hang=True, deaf_to_interrupts=True)
    state = tmp_path / "state"
    settings = settings_for(state, high.port, low.port, JOB_TIMEOUT=0.5, INTERRUPT_GRACE=0.5,
                            INSTANCE_LOST_TIMEOUT=0.5)
    result = daemon.run_files(settings, [prompt_file(tmp_path, "first", 101),
                                         prompt_file(tmp_path, "second", 101)], daemon.Stop())
    assert result.all_done and successes_once(sims)
    down = [e for e in events(state, "instance_down") if e.instance_id == "high_priority"]
    assert down and "INTERRUPT_GRACE" in down[0].reason
    assert any(e.reason == "high_priority unreachable" for e in events(state, "job_lost"))
