"""The real loop, turn by turn, over fake agents and a fake clock: dispatch, what the
servers say, reconciliation after a restart, timeouts, fallback, lost and sick
instances, and the pause while the event log cannot be written. No sockets, no sleeps:
every deadline is crossed by moving the clock."""

from __future__ import annotations

import random
import uuid

import pytest
from fakes import Harness, RefusingLog

from instances.messages import Progress
from service.dispatcher import new_prompt_id
from service.intake import SubmitFile
from statemachine.errors import BadConfig, InstanceUnreachable, PermanentDispatchError
from statemachine.job import BatchState, JobState


def test_prompt_ids_are_uuid4s_that_seeding_the_global_random_does_not_repeat() -> None:
    random.seed(7)
    first = [new_prompt_id() for _ in range(100)]
    random.seed(7)
    again = [new_prompt_id() for _ in range(100)]
    assert len(set(first) | set(again)) == 200
    assert all(uuid.UUID(p).version == 4 and str(uuid.UUID(p)) == p for p in first)


def run_job(h: Harness, instance: str, job_id: str) -> None:
    h[instance].accept(job_id)
    h[instance].start(job_id)
    h[instance].finish(job_id)
    h.settle()


def test_nothing_is_sent_before_every_instance_has_answered(tmp_path) -> None:
    h = Harness(tmp_path)
    h["high"].health(True)
    h.submit("v", 202)
    assert not h["high"].submitted and h.job("b0001/H1").state is JobState.READY
    h["low"].health(False, "connection refused")
    h.settle()
    assert [s.job_id for s in h["high"].submitted] == ["b0001/H1"]


def test_a_dispatch_intent_is_durable_before_its_post_leaves(tmp_path) -> None:
    h = Harness(tmp_path)
    h.all_up()
    durable_at_submit = []
    submit = h["high"].submit

    def checking_submit(job_id, prompt_id, *args, **kwargs):
        durable_at_submit.append(any(e.type == "job_dispatch_intent" and e.prompt_id == prompt_id
                                     for e in h.events()))
        return submit(job_id, prompt_id, *args, **kwargs)

    h["high"].submit = checking_submit  # type: ignore[method-assign]
    h.submit("v", 202)
    assert durable_at_submit == [True]


def test_a_video_runs_high_then_low_then_combine_and_comes_home(tmp_path) -> None:
    h = Harness(tmp_path)
    h.all_up()
    batch = h.submit("v", 202)
    run_job(h, "high", "b0001/H1")
    assert h.job("b0001/L1").instance_id == "low"
    run_job(h, "low", "b0001/L1")
    run_job(h, "high", "b0001/H2")  # starts from the last frame of chunk 1
    run_job(h, "low", "b0001/L2")
    combiner = h.job("b0001/C1").instance_id
    assert combiner is not None
    run_job(h, combiner, "b0001/C1")
    combiner = h.job("b0001/C2").instance_id
    assert combiner is not None
    run_job(h, combiner, "b0001/C2")
    assert h.store.batches[batch].state is BatchState.DONE
    final_instance = h.store.batches[batch].final_instance
    assert final_instance is not None
    assert h[final_instance].fetched == [batch]
    assert h.loop.run_once(h.clock()) is False  # idle


def test_progress_is_kept_while_a_job_runs_and_dropped_when_it_ends(tmp_path) -> None:
    h = Harness(tmp_path)
    h.all_up()
    h.submit("v", 202)
    h["high"].accept("b0001/H1")
    h["high"].start("b0001/H1")
    h.loop.post(Progress("high", h["high"].prompt("b0001/H1").prompt_id, "3", 4, 20))
    h.settle()
    assert h.loop.tracker.progress == {"b0001/H1": ("3", 4, 20)}
    h["high"].finish("b0001/H1")
    h.settle()
    assert h.loop.tracker.progress == {}


def test_a_failed_render_waits_for_its_retry_delay_then_goes_again(tmp_path) -> None:
    h = Harness(tmp_path, RETRY_DELAY=5, RETRY_DELAY_MAX=20)
    h.all_up()
    h.submit("v", 202)
    h["high"].accept("b0001/H1")
    h["high"].finish("b0001/H1", status="error", error="CUDA out of memory")
    h.settle()
    job = h.job("b0001/H1")
    assert job.state is JobState.READY and job.eligible_at == h.clock() + 5
    assert h["high"].withdrawals  # the server is asked to make sure it is gone
    h["high"].let_go()
    h.turn_before_and_at(5, lambda: len(h["high"].submitted) == 1)
    assert [s.job_id for s in h["high"].submitted] == ["b0001/H1", "b0001/H1"]
    assert h["high"].submitted[0].prompt_id != h["high"].submitted[1].prompt_id


def test_a_refused_workflow_fails_the_job_for_good(tmp_path) -> None:
    h = Harness(tmp_path)
    h.all_up()
    h.submit("v", 202)
    h["high"].refuse("b0001/H1", PermanentDispatchError("prompt_outputs_failed_validation"))
    h.settle()
    assert h.job("b0001/H1").state is JobState.FAILED
    assert h.store.batches["b0001"].state is BatchState.FAILED


def test_a_post_to_an_unreachable_server_marks_it_down_and_uses_no_attempt(tmp_path) -> None:
    h = Harness(tmp_path, FALLBACK=False)
    h.all_up()
    h.submit("v", 202)
    h["high"].refuse("b0001/H1", InstanceUnreachable("connection refused"))
    h.settle()
    assert h.store.instance_up["high"] is False
    assert h.job("b0001/H1").state is JobState.DISPATCHING and h.job("b0001/H1").attempts == 0
    h["high"].health(True)  # back: asked whether the POST arrived
    h.settle()
    assert h["high"].checks == [("b0001/H1", h["high"].prompt("b0001/H1").prompt_id)]
    assert not h.loop.reconciled
    h["high"].answer_check("b0001/H1", "gone")  # it never arrived: posted again, same id
    h.settle()
    first, again = h["high"].submitted
    assert again.prompt_id == first.prompt_id and h.loop.reconciled


@pytest.mark.parametrize(("where", "state"), [("history", JobState.SUCCEEDED),
                                              ("running", JobState.RUNNING),
                                              ("queue", JobState.QUEUED),
                                              ("gone", JobState.DISPATCHING)])
def test_after_a_restart_each_job_in_flight_is_looked_up_on_its_server(tmp_path, where,
                                                                        state) -> None:
    h = Harness(tmp_path)
    h.all_up()
    h.submit("v", 202)
    h["high"].accept("b0001/H1")
    h.settle()
    h.open()  # the daemon restarts; the servers stay up
    h["high"].health(True)
    h["low"].health(True)
    h.settle()
    assert h["high"].checks[-1][0] == "b0001/H1" and not h.loop.reconciled
    h["high"].answer_check("b0001/H1", where)
    h.settle()
    job = h.job("b0001/H1")
    assert h.loop.reconciled
    if where == "gone":  # lost; sent again, under a new prompt_id, once it is withdrawn
        assert h.events("job_lost") and job.state is JobState.READY
        h["high"].let_go()
        h.settle()
        assert job.state is JobState.DISPATCHING
        assert job.prompt_id != h["high"].submitted[0].prompt_id
    else:
        assert job.state is state


def test_a_render_running_past_job_timeout_fails_its_attempt_and_is_withdrawn(tmp_path
                                                                               ) -> None:
    h = Harness(tmp_path, JOB_TIMEOUT=600, RETRY_DELAY=5)
    h.all_up()
    h.submit("v", 202)
    h["high"].accept("b0001/H1")
    h["high"].start("b0001/H1")
    h.settle()
    prompt_id = h["high"].prompt("b0001/H1").prompt_id
    h.turn_before_and_at(600, lambda: h.job("b0001/H1").state is JobState.RUNNING)
    (failure,) = h.events("job_attempt_failed")
    assert "JOB_TIMEOUT" in failure.error and h.job("b0001/H1").attempts == 1
    assert h["high"].withdrawals == [(prompt_id,)]
    h.clock.advance(5)
    h.settle()
    assert len(h["high"].submitted) == 1, "new work went to a server still running a prompt"
    h["high"].let_go()
    h.settle()
    assert [s.job_id for s in h["high"].submitted] == ["b0001/H1", "b0001/H1"]


def test_a_job_queued_past_queue_timeout_moves_without_using_an_attempt(tmp_path) -> None:
    h = Harness(tmp_path, QUEUE_TIMEOUT=900)
    h.all_up()
    h.submit("v", 202)
    h["high"].accept("b0001/H1")
    h.settle()
    h.turn_before_and_at(900, lambda: h.job("b0001/H1").state is JobState.QUEUED)
    assert "QUEUE_TIMEOUT" in h.events("job_lost")[0].reason
    assert h.job("b0001/H1").attempts == 0 and h["high"].withdrawals


def test_a_server_that_does_not_let_go_within_interrupt_grace_is_down_until_it_does(
        tmp_path) -> None:
    h = Harness(tmp_path, QUEUE_TIMEOUT=900, INTERRUPT_GRACE=120, FALLBACK=False)
    h.all_up()
    h.submit("v", 202)
    h["high"].accept("b0001/H1")
    h.settle()
    h.clock.advance(900)
    h.settle()
    h.turn_before_and_at(120, lambda: h.store.instance_up["high"] is True)
    assert h.store.instance_up["high"] is False
    assert "INTERRUPT_GRACE" in h.events("instance_down")[-1].reason
    h["high"].health(True)  # it answers probes, but still holds the prompt
    h.settle()
    assert h.store.instance_up["high"] is False
    h["high"].let_go()
    h.settle()
    assert h.store.instance_up["high"] is True


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted-while-down"])
def test_jobs_on_an_instance_down_for_instance_lost_timeout_go_back_to_ready(tmp_path,
                                                                              restart) -> None:
    h = Harness(tmp_path, INSTANCE_LOST_TIMEOUT=120, FALLBACK=False)
    h.all_up()
    h.submit("v", 202)
    h["high"].accept("b0001/H1")
    h["high"].health(False, "connection refused")
    h.settle()
    if restart:  # the log says high is DOWN already; its first probe says so again
        h.open()
        h["high"].health(False, "connection refused")
        h["low"].health(True)
        h.settle()
    h.turn_before_and_at(120, lambda: h.job("b0001/H1").state is JobState.QUEUED)
    assert h.job("b0001/H1").state is JobState.READY
    assert "unreachable" in h.events("job_lost")[0].reason


@pytest.mark.parametrize("fallback", [True, False])
def test_with_its_own_instance_down_a_kind_falls_back_only_when_allowed(tmp_path, fallback
                                                                        ) -> None:
    h = Harness(tmp_path, FALLBACK=fallback)
    h["high"].health(False, "connection refused")
    h["low"].health(True)
    h.settle()
    h.submit("v", 202)
    sent = [s.job_id for s in h["low"].submitted]
    assert sent == (["b0001/H1"] if fallback else [])


def test_workflows_that_do_not_fit_a_server_stop_the_daemon_with_the_problems(tmp_path
                                                                             ) -> None:
    h = Harness(tmp_path)
    h["high"].validated("node 3: class_type 'KSamplerAdvanced' is not installed")
    h["high"].health(False, "unfit")
    h["low"].health(True)
    with pytest.raises(BadConfig, match="KSamplerAdvanced"):
        h.settle()


def test_while_the_log_cannot_be_written_nothing_is_sent_and_it_resumes_after(tmp_path
                                                                              ) -> None:
    log = RefusingLog()
    h = Harness(tmp_path, event_log=log)
    h.all_up()
    log.full = True
    path = tmp_path / "v.txt"
    path.write_text("v\n\n202\n\na test prompt\n")
    h.loop.post(SubmitFile(0, path))
    h.settle()
    assert h.loop.log_error and "EVENT LOG NOT WRITABLE" in h.loop.status_line()
    assert not h["high"].submitted and log.pending  # the batch waits in memory
    h.clock.advance(60)
    h.settle()
    assert not h["high"].submitted, "a POST left before its intent was durable"
    log.full = False
    h.settle()
    assert h.loop.log_error is None
    assert [s.job_id for s in h["high"].submitted] == ["b0001/H1"]
