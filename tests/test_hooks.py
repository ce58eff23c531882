"""The built-in hooks' schedules: the learning-rate monitor and the profiler (checkpoint and NaN hooks: test_resume)."""

import jax
import jax.numpy as jnp
import pytest
from loop_setup import Stream, setup

from xlstm_eqx.config.run import LoopConfig
from xlstm_eqx.loop import Event, Log, fit, lr_monitor, profiler


def test_lr_monitor_logs_at_its_steps_and_at_the_end_of_its_epochs(tiny):
    state, _, _, schedule, *_ = tiny
    hook = lr_monitor(schedule, every=4, every_epochs=2)
    logged = {(kind, step): hook(Event(kind, step, epoch, state))
              for kind, step, epoch in [("step", 3, 1), ("step", 4, 2), ("epoch_end", 3, 1), ("epoch_end", 6, 2),
                                        ("val_end", 4, 2), ("epoch_start", 6, 3)]}  # fmt: skip
    expected = [Log({"optimizer/lr": pytest.approx(float(schedule(0)), rel=1e-6)})]  # the count of a fresh state
    assert {key for key, actions in logged.items() if actions} == {("step", 4), ("epoch_end", 6)}
    assert logged["step", 4] == expected and logged["epoch_end", 6] == expected
    epochs_only = lr_monitor(schedule, every=0, every_epochs=1)
    assert epochs_only(Event("step", 4, 1, state)) is None and epochs_only(Event("epoch_end", 4, 1, state))


@pytest.mark.parametrize(
    "schedule_fields",
    [dict(warmup_steps=3, decay="cosine", decay_steps=6), dict(warmup_steps=0, decay="linear", decay_steps=9),
     dict(warmup_steps=2, decay="constant", cooldown_steps=4)],
)  # fmt: skip
def test_lr_monitor_logs_the_rate_each_update_applied_along_a_run(schedule_fields):
    """Through training, at every 3rd step: the documented schedule at the update count before that step."""
    from test_schedules import reference_lr

    from xlstm_eqx.config.optim import OptimConfig

    optim = OptimConfig(learning_rate=3e-3, end_lr_factor=0.1, **schedule_fields)
    state, train_step, eval_step, schedule, *_ = setup(optim=optim, total_steps=12)
    monitor, logged = lr_monitor(schedule, every=3), {}

    def record(event):
        actions = monitor(event)
        if actions:
            logged[event.step] = actions[0].metrics["optimizer/lr"]

    fit(state, train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=12), hooks=[record])
    assert sorted(logged) == [3, 6, 9, 12]
    for step, value in logged.items():
        assert value == pytest.approx(reference_lr(optim, step - 1, 12), rel=1e-5, abs=1e-9), step


def test_profiler_traces_the_step_range(tiny, tmp_path):
    state, train_step, eval_step, *_ = tiny
    fit(state, train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=5),
        hooks=[profiler(tmp_path, first_step=2, num_steps=2)])  # fmt: skip
    traces = list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert profiler(tmp_path / "off", first_step=0)(Event("step", 1, 1)) is None
    assert not (tmp_path / "off").exists()


def _trace_calls(monkeypatch, every_minutes: float) -> list[tuple[str, int]]:
    """(start/stop, step of the event that made the call) of a profiler of steps 3-4 over 20 steps, on a clock
    that moves 20 s per step."""
    calls, step = [], [0]
    monkeypatch.setattr(jax.profiler, "start_trace", lambda directory: calls.append(("start", step[0])))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop", step[0])))
    hook = profiler("unused", first_step=3, num_steps=2, every_minutes=every_minutes, clock=lambda: 20.0 * step[0])
    for n in range(20):
        step[0] = n
        hook(Event("train_start" if n == 0 else "step", n, 1, jnp.zeros(())))
    return calls


def test_profiler_traces_again_once_its_period_has_passed(monkeypatch):
    # steps 3-4 (started after step 2, stopped after step 4 at 80 s), then 60 s after each stop: 140 s = step 7, …
    assert _trace_calls(monkeypatch, 1.0) == [("start", 2), ("stop", 4), ("start", 7), ("stop", 9),
                                              ("start", 12), ("stop", 14), ("start", 17), ("stop", 19)]  # fmt: skip
    assert _trace_calls(monkeypatch, -1.0) == [("start", 2), ("stop", 4)]  # only once
