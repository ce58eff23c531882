"""Token-level scoring for the LM Evaluation Harness adapter: continuation log-likelihoods (batched, padded,
sorted by length) and whole-document log-likelihoods, in fixed windows or recurrently over chunks.

Every function takes plain token lists and an :class:`~xlstm_eqx.models.lm.xLSTMLM`; the model runs on one
device (the harness hands over requests one process at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


@eqx.filter_jit
def _row_scores(
    model: eqx.Module, inputs: Int[Array, "b t"], targets: Int[Array, "b t"], scored: Bool[Array, "b t"]
) -> tuple[Float[Array, " b"], Bool[Array, " b"]]:
    """Σ log p(target) over the scored positions of each row, and whether every scored target is the argmax."""
    logits = jax.vmap(lambda row: model(row, check_token_ids=False)[0])(inputs).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1).astype(targets.dtype) == targets
    return jnp.sum(jnp.where(scored, picked, 0.0), axis=-1), jnp.all(greedy | ~scored, axis=-1)


def _bucket(length: int, limit: int) -> int:
    """Padded length: the next power of two (≥ 16), capped at ``limit``; few shapes, few compilations."""
    return min(max(16, 1 << (length - 1).bit_length()), limit)


def score_continuations(
    model: eqx.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    context_length: int,
    batch_size: int,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) for each (context tokens, continuation tokens) pair.

    Inputs are ``context + continuation[:-1]``; only the continuation's positions are scored. A pair longer than
    ``context_length`` inputs keeps its last ``context_length`` (the oldest context is dropped); a continuation
    that alone exceeds the window is an error (score it with :func:`score_document`). Requests run longest
    first in batches of ``batch_size``, right-padded (causal: padding never changes earlier positions).
    """
    rows = []
    for index, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f"request {index}: empty continuation (nothing to score)")
        if not context:
            raise ValueError(f"request {index}: empty context; start it with the end-of-document token")
        if len(continuation) > context_length:
            raise ValueError(
                f"request {index}: continuation of {len(continuation)} tokens exceeds context_length={context_length}"
            )
        tokens = (list(context) + list(continuation))[-(context_length + 1) :]
        rows.append((index, tokens, len(continuation)))
    rows.sort(key=lambda row: -len(row[1]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = _bucket(max(len(tokens) - 1 for _, tokens, _ in chunk), context_length)
        inputs = np.zeros((batch_size, length), np.int32)
        targets = np.zeros((batch_size, length), np.int32)
        scored = np.zeros((batch_size, length), bool)
        for r, (_, tokens, n) in enumerate(chunk):
            t = len(tokens) - 1
            inputs[r, :t], targets[r, :t] = tokens[:-1], tokens[1:]
            scored[r, t - n : t] = True
        sums, greedy = jax.device_get(
            _row_scores(model, jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(scored))
        )
        for r, (index, _, _) in enumerate(chunk):
            out[index] = (float(sums[r]), bool(greedy[r]))
    return out


@eqx.filter_jit
def _chunk_scores(
    model: eqx.Module, inputs: Int[Array, " c"], targets: Int[Array, " c"], scored: Bool[Array, " c"], state
) -> tuple[Float[Array, ""], Bool[Array, ""], object]:
    logits, state = model(inputs, state, check_token_ids=False)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    greedy = jnp.argmax(logits, axis=-1).astype(targets.dtype) == targets
    return jnp.sum(jnp.where(scored, picked, 0.0)), jnp.all(greedy | ~scored), state


def score_document(model: eqx.Module, tokens: Sequence[int], *, eod_id: int, chunk_size: int) -> tuple[float, bool]:
    """(log p(tokens), is_greedy) of a whole document of any length, recurrently: inputs ``EOD t1 … t(n-1)``
    go through the model in chunks of ``chunk_size`` with the recurrent state carried, so every token is
    conditioned on everything before it (the last chunk is padded and the padding is not scored)."""
    if not tokens:
        raise ValueError("empty document (nothing to score)")
    inputs, targets = [eod_id, *tokens[:-1]], list(tokens)
    state, total, greedy = model.init_state(), 0.0, True
    for start in range(0, len(inputs), chunk_size):
        n = min(chunk_size, len(inputs) - start)
        pad = chunk_size - n
        chunk_in = jnp.asarray(inputs[start : start + n] + [0] * pad, jnp.int32)
        chunk_target = jnp.asarray(targets[start : start + n] + [0] * pad, jnp.int32)
        scored = jnp.arange(chunk_size) < n
        value, is_greedy, state = _chunk_scores(model, chunk_in, chunk_target, scored, state)
        total += float(value)
        greedy = greedy and bool(is_greedy)
    return total, greedy
