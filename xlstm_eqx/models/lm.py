"""The xLSTM language model: embedding → stacked blocks (scanned) → RMSNorm → head → logit soft cap."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int, Integer, PRNGKeyArray

from ..config import ModelConfig
from .block import XLSTMBlock
from .kernels import MLSTMState
from .layers import apply_norm, gate_dtype, normal_, project, rms_norm, small_init_std, soft_cap
from .matmul_policy import upcasts_low_precision_matmul
from .remat import REMAT_POLICIES

# Config fields that change how the model runs, never what it computes (beyond rounding).
EXECUTION_POLICY_FIELDS = ("kernel", "chunk_size", "compute_dtype", "low_precision_matmul", "remat", "scan_blocks")


def outside_vocab(ids: Integer[Array, "*shape"], vocab_size: int) -> Bool[Array, "*shape"]:
    """Which ids lie outside [0, vocab_size), compared in at least 32 bits: in a narrow or unsigned id dtype
    (uint8 bytes, int16) ``vocab_size`` itself would wrap (uint8: 256 → 0, flagging every id)."""
    wide = ids.astype(jnp.int64 if jnp.dtype(ids.dtype).itemsize == 8 else jnp.int32)
    return (wide < 0) | (wide >= vocab_size)


def check_token_range(tokens: Int[Array, "*shape"], vocab_size: int) -> Int[Array, "*shape"]:
    """``tokens``, raising ``EquinoxRuntimeError`` (eagerly or from inside jit) if any id is outside [0, vocab)."""
    return eqx.error_if(tokens, outside_vocab(tokens, vocab_size), f"token id outside [0, vocab_size={vocab_size})")


class xLSTMLM(eqx.Module):  # noqa: N801 - the model's published name
    """One sequence in, logits and the recurrent state out; :meth:`forward_batch` runs a batch of rows.

    ``state`` holds every block's memory stacked on a leading block axis:
    C (blocks, heads, DK, DV), n (blocks, heads, DK), m (blocks, heads). Running a sequence
    whole, in chunks with the state carried, or token by token gives the same logits.
    """

    embedding: eqx.nn.Embedding
    blocks: XLSTMBlock  # parameters stacked on a leading num_blocks axis
    out_norm: eqx.nn.RMSNorm
    lm_head: eqx.nn.Linear | None  # None when tied to the embedding
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        c, dtype = config, jnp.dtype(config.param_dtype)
        k_embed, k_blocks, k_head = jax.random.split(key, 3)
        std = small_init_std(c.embedding_dim)
        embed = eqx.nn.Embedding(c.vocab_size, c.embedding_dim, dtype=dtype, key=k_embed)
        self.embedding = eqx.tree_at(
            lambda m: m.weight, embed, std * jax.random.normal(k_embed, embed.weight.shape, dtype)
        )
        self.blocks = eqx.filter_vmap(lambda k: XLSTMBlock(c, key=k))(jax.random.split(k_blocks, c.num_blocks))
        self.out_norm = rms_norm(c.embedding_dim, c.norm_eps, dtype)
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else normal_(
                eqx.nn.Linear(c.embedding_dim, c.vocab_size, use_bias=False, dtype=dtype, key=k_head),
                std,
                k_head,
            )
        )
        self.config = config

    def __call__(
        self,
        tokens: Int[Array, " t"],
        state: MLSTMState | None = None,
        *,
        reset: Bool[Array, " t"] | None = None,
        kernel: str | None = None,
        tp_axis: str | None = None,
        check_token_ids: bool = True,
    ) -> tuple[Float[Array, "t vocab"], MLSTMState]:
        """Logits (float32) for every position and the state after the last token.

        ``reset[t]`` marks a document start: the memory is wiped before token t is written.
        ``kernel`` overrides the configured mLSTM kernel for this call. ``tp_axis`` names the mesh axis over
        which heads and FFN features are split when called inside ``shard_map`` with tensor parallelism.
        Token ids outside [0, vocab_size) raise an ``EquinoxRuntimeError``, eagerly and under ``jit`` alike (the
        check runs on device; set ``EQX_ON_ERROR=nan`` to turn it off). Inside ``shard_map`` the check cannot
        run: callers there pass ``check_token_ids=False`` and validate the global batch beforehand.
        """
        logits, state, _ = self.forward_with_intermediates(
            tokens, state, reset=reset, kernel=kernel, tp_axis=tp_axis, check_token_ids=check_token_ids
        )
        return logits, state

    def forward_with_intermediates(
        self,
        tokens: Int[Array, " t"],
        state: MLSTMState | None = None,
        *,
        reset: Bool[Array, " t"] | None = None,
        kernel: str | None = None,
        tp_axis: str | None = None,
        check_token_ids: bool = True,
    ) -> tuple[Float[Array, "t vocab"], MLSTMState, dict[str, Float[Array, " blocks"]]]:
        """``__call__`` plus per-block diagnostics: mean input-gate pre-activation, mean forget gate and mean
        |cell output|, each of shape (num_blocks,). ``__call__`` drops them (XLA removes the unused work)."""
        if state is not None:
            self.check_state(state, (), tp_axis)
        add_row = lambda tree: jax.tree.map(lambda a: a[None], tree)  # noqa: E731
        logits, state, stats = self.forward_batch(
            tokens[None], add_row(state), reset=add_row(reset), kernel=kernel, tp_axis=tp_axis,
            check_token_ids=check_token_ids,
        )  # fmt: skip
        return jax.tree.map(lambda a: a[0], (logits, state, stats))

    def forward_batch(
        self,
        tokens: Int[Array, "batch t"],
        state: MLSTMState | None = None,
        *,
        reset: Bool[Array, "batch t"] | None = None,
        kernel: str | None = None,
        tp_axis: str | None = None,
        check_token_ids: bool = True,
    ) -> tuple[Float[Array, "batch t vocab"], MLSTMState, dict[str, Float[Array, "batch blocks"]]]:
        """A batch of rows at once: the same results as ``vmap`` of :meth:`forward_with_intermediates`, faster.

        ``state`` leaves are (batch, blocks, heads, …), as ``vmap`` over rows would stack them. Dense layers see
        all batch·t rows as one matrix, so their weight gradients are plain 2-D products.
        """
        features, state, stats = self.features_batch(
            tokens, state, reset=reset, kernel=kernel, tp_axis=tp_axis, check_token_ids=check_token_ids
        )
        return self.head(features), state, stats

    def features_batch(
        self,
        tokens: Int[Array, "batch t"],
        state: MLSTMState | None = None,
        *,
        reset: Bool[Array, "batch t"] | None = None,
        kernel: str | None = None,
        tp_axis: str | None = None,
        check_token_ids: bool = True,
    ) -> tuple[Float[Array, "batch t d"], MLSTMState, dict[str, Float[Array, "batch blocks"]]]:
        """:meth:`forward_batch` without the head: the normed last hidden states (compute dtype), the state and
        the stats. ``head(features)`` gives the logits; callers that need logits a slice of positions at a time
        (long-document evaluation) apply it piecewise, so (batch, t, vocab) never exists at once."""
        c = self.config
        if state is not None:
            self.check_state(state, tokens.shape[:1], tp_axis)
        if check_token_ids:
            tokens = check_token_range(tokens, c.vocab_size)
        x = jnp.take(self.embedding.weight, tokens, axis=0).astype(c.compute_dtype)
        blocks_first = lambda tree: jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), tree)  # noqa: E731
        x, state, stats = self._run_blocks(x, blocks_first(state), reset, kernel, tp_axis)
        return apply_norm(self.out_norm, x), blocks_first(state), blocks_first(stats)

    def head(self, features: Float[Array, "*rows d"]) -> Float[Array, "*rows vocab"]:
        """Logits (float32, soft-capped) of normed hidden states from :meth:`features_batch`."""
        c = self.config
        head_weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        upcast = upcasts_low_precision_matmul(c.low_precision_matmul)
        logits = project(features, head_weight, out_dtype=gate_dtype(c.compute_dtype), upcast=upcast)
        return soft_cap(logits, c.output_logit_soft_cap)

    def _run_blocks(self, x, state, reset, kernel, tp_axis):
        """x (batch, t, d); state leaves (blocks, batch, …) or None. Returns x, state and stats stacked on blocks."""
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(x, layer):
            block_params, block_state = layer
            block = eqx.combine(block_params, static)
            x, block_state, stats = block(x, block_state, reset, kernel=kernel, tp_axis=tp_axis)
            return x, (block_state, stats)

        policy = self.config.remat
        if policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
        if self.config.scan_blocks:
            x, (state, stats) = lax.scan(body, x, (params, state))
            return x, state, stats
        outputs = []
        for i in range(self.config.num_blocks):
            x, out = body(x, jax.tree.map(lambda a, i=i: a[i], (params, state)))
            outputs.append(out)
        state, stats = jax.tree.map(lambda *s: jnp.stack(s), *outputs)
        return x, state, stats

    def with_policy(self, **changes) -> xLSTMLM:
        """The same parameters run under another execution policy (kernel, chunk size, dtype, remat…)."""
        unknown = set(changes) - set(EXECUTION_POLICY_FIELDS)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not execution-policy fields {EXECUTION_POLICY_FIELDS}")
        config = dataclasses.replace(self.config, **changes)
        skeleton = eqx.filter_eval_shape(xLSTMLM, config, key=jax.random.key(0))
        is_leaf_array = lambda x: isinstance(x, jax.Array | jax.ShapeDtypeStruct)  # noqa: E731
        shapes, static = eqx.partition(skeleton, is_leaf_array)
        arrays = jax.tree.unflatten(jax.tree.structure(shapes), jax.tree.leaves(eqx.filter(self, is_leaf_array)))
        return eqx.combine(arrays, static)

    def check_state(self, state: Any, rows: tuple[int, ...] = (), tp_axis: str | None = None) -> None:
        """A clear error for a recurrent state that is not this model's: not an ``MLSTMState``, leaves not
        floating point, or shapes other than ``rows`` + :meth:`init_state`'s (batch, blocks, heads, …). With
        ``tp_axis`` (inside ``shard_map``) the heads axis holds this device's share and is not compared."""
        if not isinstance(state, MLSTMState):
            raise TypeError(f"state must be an MLSTMState (init_state() or a previous call's), got {type(state)}")
        c = self.config
        lead = (*rows, c.num_blocks, c.num_heads)
        expected = {"C": (*lead, c.qk_head_dim, c.v_head_dim), "n": (*lead, c.qk_head_dim), "m": lead}
        heads = len(rows) + 1
        for name, want in expected.items():
            leaf = getattr(state, name)
            have = tuple(jnp.shape(leaf))
            same = len(have) == len(want) and all(
                h == w or (tp_axis is not None and i == heads) for i, (h, w) in enumerate(zip(have, want))
            )
            if not same:
                axes = "(rows, blocks, heads, …)" if rows else "(blocks, heads, …)"
                raise ValueError(f"state.{name} has shape {have}; this model's is {want} {axes}")
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise TypeError(f"state.{name} must be floating point, got {jnp.result_type(leaf)}")

    def init_state(self) -> MLSTMState:
        """The empty memory for one sequence (all zeros, m = 0)."""
        c = self.config
        shape, dtype = (c.num_blocks, c.num_heads), gate_dtype(c.compute_dtype)
        return MLSTMState(
            jnp.zeros((*shape, c.qk_head_dim, c.v_head_dim), dtype),
            jnp.zeros((*shape, c.qk_head_dim), dtype),
            jnp.zeros(shape, dtype),
        )
