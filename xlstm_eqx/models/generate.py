"""Autoregressive sampling from an :class:`~xlstm_eqx.models.xLSTMLM`: a parallel prefill, then O(1) recurrent steps.

The prompt runs through the model once with its configured (chunkwise or parallel) kernel, which yields the logits
of the last prompt position and the recurrent state after it. Every further token is one ``lax.scan`` step that
feeds the previous token through the model with the state carried (a single token always takes the recurrent
step), so a token costs the same however long the context is.

``generate`` is traceable (wrap it in ``jit`` yourself, with ``num_tokens``, ``temperature``, ``top_k``,
``eod_id`` and ``top_p`` static); ``generate_jit`` checks the arguments eagerly and runs a compiled version, one
compilation per prompt length and setting. ``sample_text`` goes from text to text with a
:class:`~xlstm_eqx.data.tokenizer.Tokenizer`, starting every prompt with the EOD token as training does.
"""

from __future__ import annotations

import operator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..data.tokenizer import Tokenizer, check_fits_model
from .lm import xLSTMLM

__all__ = ["generate", "generate_jit", "sample_text"]

IntLike = int | np.integer  # numpy integers are taken as the Python ints they equal (static under jit)
FloatLike = float | int  # temperature=1 and top_p=1 as well as 1.0 (a runtime type checker tells them apart)


def _is_int(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _static_int(value: IntLike | None) -> int | None:
    """A checked int argument as a Python int: a numpy integer would be traced as an array under ``filter_jit``."""
    return None if value is None else operator.index(value)


def check_generate_args(
    model: xLSTMLM,
    prompt: Array | np.ndarray,
    num_tokens: IntLike,
    temperature: FloatLike,
    top_k: IntLike | None,
    eod_id: IntLike | None = None,
    top_p: FloatLike | None = None,
) -> bool:
    """Raise ``ValueError``/``TypeError`` naming the offending argument. The prompt's token ids are checked here
    when the prompt is concrete; a traced prompt is checked on device by the model's forward instead. Returns
    whether the ids were checked here (the forward then skips its check)."""
    vocab = model.config.vocab_size
    if not _is_int(num_tokens):
        raise TypeError(f"num_tokens must be a Python int (it is static under jit), got {type(num_tokens).__name__}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(
            f"temperature must be a Python float (it is static under jit), got {type(temperature).__name__}"
        )
    if not temperature >= 0 or temperature == float("inf"):  # also rejects NaN
        raise ValueError(f"temperature must be finite and >= 0 (0 means greedy), got {temperature}")
    if top_k is not None:
        if not _is_int(top_k):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be in [1, vocab_size={vocab}] or None, got {top_k}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a float in (0, 1] or None, got {top_p!r}")
    if eod_id is not None:
        if not _is_int(eod_id):
            raise TypeError(f"eod_id must be an int or None, got {type(eod_id).__name__}")
        if not 0 <= eod_id < vocab:
            raise ValueError(f"eod_id must be in [0, vocab_size={vocab}) or None, got {eod_id}")
    shape, dtype = jnp.shape(prompt), jnp.result_type(prompt)
    if len(shape) != 1:
        raise ValueError(f"prompt must be a 1-D array of token ids (one unbatched sequence), got shape {shape}")
    if shape[0] == 0:
        raise ValueError("prompt is empty: generation needs at least one token (e.g. the EOD/BOS id)")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"prompt must hold integer token ids, got dtype {dtype}")
    if isinstance(prompt, jax.core.Tracer):
        return False
    ids = np.asarray(prompt)
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"prompt has token ids outside [0, vocab_size={vocab}): {int(bad.sum())} of them, "
            f"the first is {int(ids[first])} at position {first}"
        )
    return True


def _sample(
    logits: Float[Array, " vocab"],
    key: PRNGKeyArray,
    temperature: float,
    top_k: int | None,
    top_p: float | None = None,
) -> Array:
    """One token id (int32) from one position's logits: among the ``top_k`` best, then within the smallest set
    of those whose probability reaches ``top_p`` (nucleus; the best token is always kept)."""
    if temperature == 0:
        return jnp.argmax(logits).astype(jnp.int32)  # argmax is int64 under x64
    scaled = logits / temperature
    if top_k is None and top_p is None:
        return jax.random.categorical(key, scaled).astype(jnp.int32)
    # Sample among exactly the k best (ties broken like lax.top_k: lower id first), so top_k=1 is greedy.
    values, indices = lax.top_k(scaled, top_k if top_k is not None else scaled.shape[-1])
    if top_p is not None:
        probs = jax.nn.softmax(values)
        better_mass = jnp.cumsum(probs) - probs  # probability of the strictly better candidates
        values = jnp.where(better_mass < top_p, values, -jnp.inf)
    return indices[jax.random.categorical(key, values)].astype(jnp.int32)


def _generate(
    model: xLSTMLM,
    prompt: Array,
    num_tokens: int,
    key: PRNGKeyArray,
    temperature: float,
    top_k: int | None,
    eod_id: int | None,
    top_p: float | None = None,
    check_prompt: bool = True,
) -> Array:
    # Prefill: one call with the configured parallel/chunkwise kernel. With eod_id, every EOD input starts a fresh
    # document (memory wiped before it is written), as in training where each document's inputs begin with EOD.
    # Only a prompt that check_generate_args could not check on the host (a traced one) is checked here: the
    # check's host callback would keep the program out of JAX's persistent compilation cache.
    reset = None if eod_id is None else prompt == eod_id
    logits, state = model(prompt, reset=reset, check_token_ids=check_prompt)
    keys = jax.random.split(key, num_tokens)
    first = _sample(logits[-1], keys[0], temperature, top_k, top_p)

    def step(carry, step_key):
        state, previous = carry
        # One token takes the recurrent step: O(1) in the context length. Sampled ids are in range by construction.
        reset = None if eod_id is None else (previous == eod_id)[None]
        logits, state = model(previous[None], state, reset=reset, kernel="recurrent", check_token_ids=False)
        token = _sample(logits[0], step_key, temperature, top_k, top_p)
        return (state, token), token

    # num_tokens - 1 steps: the first token came from the prefill logits, and no forward is spent after the last.
    _, rest = lax.scan(step, (state, first), keys[1:])
    return jnp.concatenate([first[None], rest])


def generate(
    model: xLSTMLM,
    prompt: Int[Array | np.ndarray, " p"],
    num_tokens: IntLike,
    *,
    key: PRNGKeyArray,
    temperature: FloatLike = 1.0,
    top_k: IntLike | None = None,
    eod_id: IntLike | None = None,
    top_p: FloatLike | None = None,
) -> Int[Array, " num_tokens"]:
    """``num_tokens`` token ids (int32) continuing ``prompt`` (a 1-D array of ids, at least one).

    Each token is drawn with ``jax.random.categorical`` from ``logits / temperature``, restricted to the
    ``top_k`` most likely ids and then to the nucleus of probability ``top_p`` when given; ``temperature=0`` is
    greedy (argmax; ``key``, ``top_k`` and ``top_p`` unused).
    The same ``key`` gives the same tokens. The prompt is prefilled in one forward call and every new token is
    one recurrent step in a single ``lax.scan``. Traceable: under ``jit`` keep ``num_tokens``, ``temperature``,
    ``top_k``, ``eod_id`` and ``top_p`` static (``generate_jit`` does that for you).

    ``eod_id`` (the end-of-document id, optional): an EOD input, in the prompt or generated, wipes the memory
    before it is written, so text after an EOD starts a fresh document as in training (each training document's
    inputs start with EOD on an empty memory). Without it the memory runs on across document breaks.
    """
    checked = check_generate_args(model, prompt, num_tokens, temperature, top_k, eod_id, top_p)
    num_tokens, top_k, eod_id = _static_int(num_tokens), _static_int(top_k), _static_int(eod_id)
    top_p = None if top_p is None else float(top_p)
    return _generate(model, jnp.asarray(prompt), num_tokens, key, float(temperature), top_k, eod_id, top_p, not checked)


_generate_compiled = eqx.filter_jit(_generate)  # arrays traced; Python scalars (the settings) static


def generate_jit(
    model: xLSTMLM,
    prompt: Int[Array | np.ndarray, " p"],
    num_tokens: IntLike,
    *,
    key: PRNGKeyArray,
    temperature: FloatLike = 1.0,
    top_k: IntLike | None = None,
    eod_id: IntLike | None = None,
    top_p: FloatLike | None = None,
) -> Int[Array, " num_tokens"]:
    """:func:`generate`, compiled: arguments are checked eagerly, then one jitted call does the prefill and the
    scan. Recompiles for a new prompt length, ``num_tokens``, ``temperature``, ``top_k`` or ``eod_id``."""
    checked = check_generate_args(model, prompt, num_tokens, temperature, top_k, eod_id, top_p)
    num_tokens, top_k, eod_id = _static_int(num_tokens), _static_int(top_k), _static_int(eod_id)
    top_p = None if top_p is None else float(top_p)
    return _generate_compiled(model, prompt, num_tokens, key, float(temperature), top_k, eod_id, top_p, not checked)


def sample_text(
    model: xLSTMLM,
    tokenizer: Tokenizer,
    prompt_text: str,
    num_tokens: int,
    *,
    key: PRNGKeyArray,
    temperature: FloatLike = 0.8,
    top_k: int | None = 40,
) -> str:
    """``prompt_text`` followed by ``num_tokens`` sampled tokens, decoded as one string.

    The model sees ``EOD + prompt`` (the EOD token plays BOS, as at the start of every training document), so an
    empty prompt starts a fresh document from the EOD token alone; that leading EOD is not part of the returned
    text. A generated EOD starts a new document (memory wiped, see ``eod_id`` in :func:`generate`). Prompt and
    continuation are decoded together so that byte-level pieces split across the boundary join up; special
    tokens the model emits (``<|endoftext|>``) are kept in the text, marking document breaks.
    """
    check_fits_model(tokenizer, model.config.vocab_size)
    prompt_ids = tokenizer.encode(prompt_text)
    tokens = generate_jit(
        model,
        jnp.asarray([tokenizer.eod_id, *prompt_ids], dtype=jnp.int32),
        num_tokens,
        key=key,
        temperature=temperature,
        top_k=top_k,
        eod_id=tokenizer.eod_id,
    )
    # a multi-process run samples on every process alike (the weights span all of them); gather the tokens
    return tokenizer.decode(prompt_ids + np.asarray(multihost_utils.process_allgather(tokens, tiled=True)).tolist())
