"""Event combinators (pure): every_n_steps / every_n_epochs filters, main_process_only, on, fire; plan_steps."""

import pytest
from loop_setup import recorder

from xlstm_eqx.config.run import LoopConfig
from xlstm_eqx.loop import Event, Log, Stop, every_n_epochs, every_n_steps, fire, main_process_only, on, plan_steps


def events_of(kinds_steps):
    return [Event(kind, step, epoch, trigger=trigger) for kind, step, epoch, trigger in kinds_steps]


@pytest.mark.parametrize("n", [-1, 1, 2, 7])
def test_every_n_steps_fires_only_at_multiples(n):
    hook, seen = recorder()
    filtered = every_n_steps(n, hook)
    for step in range(1, 30):
        filtered(Event("step", step, 1))
    filtered(Event("val_end", 5, 1, trigger="step"))
    expected = [s for s in range(1, 30) if n > 0 and s % n == 0]
    assert [s for kind, s, _, _ in seen if kind == "step"] == expected
    assert ("val_end", 5, 1, "step") in seen  # other events pass


@pytest.mark.parametrize("n", [-1, 1, 2, 7])
def test_every_n_epochs_filters_epoch_events_and_epoch_validations(n):
    hook, seen = recorder()
    filtered = every_n_epochs(n, hook)
    for epoch in range(1, 15):
        filtered(Event("epoch_start", epoch * 10 - 10, epoch))
        filtered(Event("epoch_end", epoch * 10, epoch))
        filtered(Event("val_end", epoch * 10, epoch, trigger="epoch"))
        filtered(Event("val_end", epoch * 10 - 5, epoch, trigger="step"))
    fired = {(k, e) for k, _, e, t in seen if t != "step"}
    expected = {(k, e) for e in range(1, 15) if n > 0 and e % n == 0 for k in ("epoch_start", "epoch_end", "val_end")}
    assert fired == expected
    assert len([1 for k, _, _, t in seen if t == "step"]) == 14  # step-triggered validations never skipped


def test_main_process_only_and_on():
    hook, seen = recorder()
    main_process_only(on(["step"], hook))(Event("step", 1, 1, process_index=1))
    main_process_only(on(["step"], hook))(Event("val_end", 1, 1))
    main_process_only(on(["step"], hook))(Event("step", 2, 1, process_index=0))
    assert seen == [("step", 2, 1, "")]
    with pytest.raises(ValueError, match="unknown event kinds"):
        on(["stepp"], hook)
    with pytest.raises((ValueError, TypeError), match="stepp"):  # TypeError when beartype checks the Literal
        Event("stepp", 1, 1)


def test_fire_merges_logs_and_keeps_first_stop():
    hooks = [
        lambda e: [Log({"a": 1.0})],
        lambda e: [Stop("nan", "first"), Log({"b": 2.0}, "val")],
        lambda e: [Stop("other", "second"), Log({"c": 3.0})],
    ]
    logged, stop = fire(hooks, Event("step", 3, 1))
    assert logged == {None: {"a": 1.0, "c": 3.0}, "val": {"b": 2.0}}
    assert stop == Stop("nan", "first")
    with pytest.raises(TypeError, match="expected Log or Stop"):
        fire([lambda e: ["oops"]], Event("step", 1, 1))


def test_plan_steps():
    assert plan_steps(LoopConfig(num_epochs=3), 7) == (21, 7)
    assert plan_steps(LoopConfig(num_train_steps=10), None) == (10, 10)
    assert plan_steps(LoopConfig(num_train_steps=10, steps_per_epoch=4), 99) == (10, 4)
    with pytest.raises(ValueError, match="loop.num_train_steps"):
        plan_steps(LoopConfig(), 5)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        plan_steps(LoopConfig(num_epochs=2), None)
