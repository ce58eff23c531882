"""What the backward pass keeps: the remat policies and the values they save by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array

# The name under which `saved` marks values for the "dots" policy (remat policies cannot see products inside a
# custom VJP such as `layers.mixed_precision_matmul`, so those outputs are saved by name).
SAVED_FOR_BACKWARD = "saved_for_backward"

REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(SAVED_FOR_BACKWARD),
    ),
}


@jax.custom_vjp
def saved(x: Array) -> Array:
    """``x`` unchanged, marked for the ``"dots"`` policy to keep for the backward pass instead of recomputing it.

    A 16-bit float is saved as its ``uint16`` bits. Under scanned blocks the saved values of every block are
    stacked with a dynamic-update-slice per block, and XLA:CPU runs a bfloat16 one by converting the whole stack
    to float32 and back at every block, while an integer one is updated in place (config B in bf16: +3 to +4%
    train tokens/s with the saved projection outputs stacked as bits; benchmarks/README.md). The marking sits in
    a custom VJP (identity gradient) because a bit cast has no derivative.
    """
    return x


def _saved_fwd(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2:
        bits = checkpoint_name(lax.bitcast_convert_type(x, jnp.uint16), SAVED_FOR_BACKWARD)
        return lax.bitcast_convert_type(bits, x.dtype), None
    return checkpoint_name(x, SAVED_FOR_BACKWARD), None


def _saved_bwd(_, g):
    return (g,)


saved.defvjp(_saved_fwd, _saved_bwd)
