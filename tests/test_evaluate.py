"""Evaluation inside and beside fit: named validation sets, progress bars, one compiled program, split and padded
sets, and the checks fit runs on its evaluation data before training."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from loop_setup import Stream, eval_set, recorder

from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.run import LoopConfig
from xlstm_eqx.loop import evaluate, fit
from xlstm_eqx.parallel import make_mesh
from xlstm_eqx.train import make_eval_step, to_host


def test_dict_of_validation_sets_prefixes_each_sets_metrics(tiny):
    state, train_step, eval_step, *_ = tiny
    sets = {"plays": eval_set(1, seed=7), "sonnets": lambda: iter(eval_set(2, seed=8))}
    config = LoopConfig(num_train_steps=2, check_val_every_n_epoch=1)
    result = fit(state, train_step, eval_step, Stream(), config=config, val_data=sets)
    metrics = result.results["val_epoch_1"]
    alone = {name: evaluate(eval_step, result.state, one) for name, one in sets.items()}
    for name in sets:
        for key in ("loss", "accuracy", "perplexity"):
            assert metrics[f"{name}_{key}"] == alone[name][key]
    assert "loss" not in metrics


def test_validation_and_test_passes_show_bars_of_their_own_when_the_progress_bar_is_on(tiny, capsys):
    start, train_step, eval_step, *_ = tiny
    sets = {"plays": eval_set(2, seed=7), "sonnets": lambda: iter(eval_set(1, seed=8))}
    for shown in (True, False):
        config = LoopConfig(num_train_steps=2, check_val_every_n_epoch=1, enable_progress_bar=shown)
        state = jax.tree.map(jnp.copy, start)  # fit donates it; each run trains, validates and tests
        result = fit(state, train_step, eval_step, Stream(), config=config, val_data=sets, test_data=eval_set(1))
        assert sorted(result.results) == ["test", "val_epoch_1"]
        bars = capsys.readouterr().err
        labels = ("Training", "validation plays", "validation sonnets", "test")
        assert [label in bars for label in labels] == [shown] * 4, bars
        assert ("/2" in bars.partition("validation plays")[2]) == shown  # a list's length is the bar's total


def test_evaluation_compiles_one_program_for_first_and_later_batches_and_any_optimizer_state(tiny):
    state, _, _, _, static, _ = tiny
    eval_step = make_eval_step(static, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    data = eval_set(3)
    whole = evaluate(eval_step, state, data)
    by_hand = None
    for batch in data:
        by_hand = eval_step(state, batch, by_hand)
    assert to_host(by_hand)["loss"] == whole["loss"]
    without_optimizer = eqx.tree_at(lambda s: s.opt_state, state, ())  # e.g. a state restored for testing
    assert evaluate(eval_step, without_optimizer, data)["loss"] == whole["loss"]
    assert eval_step.batch_step._cache_size() == 1  # running metrics absent or not, optimizer state or not


def test_evaluation_does_not_depend_on_how_a_set_is_split_and_padded(tiny):
    """The same rows as one batch, or split unevenly over two batches filled up with fully masked padding rows
    (as the evaluation pipeline pads its last batch): the same token-weighted loss and accuracy."""
    state, _, eval_step, *_ = tiny
    full = next(Stream(seed=5))

    def rows(batch, start, stop, total):
        def take(x):
            pad = jnp.zeros((total - (stop - start), *x.shape[1:]), x.dtype)
            return jnp.concatenate([x[start:stop], pad])

        return jax.tree.map(take, batch)

    whole = evaluate(eval_step, state, [full])
    split = evaluate(eval_step, state, [rows(full, 0, 5, 8), rows(full, 5, 8, 8)])
    for name in ("loss", "accuracy"):
        assert split[name] == pytest.approx(whole[name], rel=1e-6), name


def test_a_validation_iterator_is_refused_before_training(tiny):
    state, train_step, eval_step, *_ = tiny
    config = LoopConfig(num_train_steps=4, check_val_every_n_steps=2)
    with pytest.raises(TypeError, match="val_data is an iterator"):
        fit(state, train_step, eval_step, Stream(), config=config, val_data=iter(eval_set(1)))
    with pytest.raises(TypeError, match=r"val_data\['plays'\] is an iterator"):
        fit(state, train_step, eval_step, Stream(), config=config, val_data={"a": eval_set(1), "plays": Stream()})


def test_a_failing_eval_step_fails_before_the_first_train_step(tiny):
    state, train_step, eval_step, *_ = tiny
    hook, seen = recorder()

    def broken(state, batch, metrics):
        if batch.inputs.shape[0] != 3:
            raise ValueError("global batch size 8 is not divisible by data×fsdp = 3")
        return eval_step(state, batch, metrics)

    config = LoopConfig(num_train_steps=8, check_val_every_n_steps=4)
    with pytest.raises(ValueError, match="not divisible") as raised:
        fit(state, train_step, broken, Stream(), config=config, val_data={"plays": eval_set(1)}, hooks=[hook])
    assert "first batch of validation set 'plays', checked before training" in str(raised.value.__notes__)
    assert [kind for kind, *_ in seen] == []  # not even train_start: no step was taken
