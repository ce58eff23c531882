"""Model configuration of the xLSTM-7B-style ("mLSTM v1") language model."""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass
from typing import Literal

from .parsing import ConfigError

KernelName = Literal["chunkwise", "parallel", "recurrent"]
DType = Literal["float32", "bfloat16", "float64"]
LowPrecisionMatmul = Literal["auto", "native", "upcast"]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes, numerics and execution policy of an :class:`xlstm_eqx.models.xLSTMLM`.

    Field names follow transformers' ``xLSTMConfig`` where one exists, so HF checkpoints map 1:1.
    """

    vocab_size: int = 50304
    embedding_dim: int = 768
    num_blocks: int = 12
    num_heads: int = 4
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    use_bias: bool = False
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    norm_eps: float = 1e-6
    cell_eps: float = 1e-6
    cell_norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    tie_word_embeddings: bool = False
    # Initialisation (xlstm-jax mLSTMv1 defaults).
    igate_bias_init: float = -10.0
    fgate_bias_init: tuple[float, float] = (3.0, 6.0)
    output_init: Literal["wang", "small"] = "wang"
    # Execution policy.
    kernel: KernelName = "chunkwise"
    chunk_size: int = 64
    compute_dtype: DType = "float32"
    param_dtype: DType = "float32"
    # How bfloat16 products run (same numbers either way, see models/matmul_policy.py): "native" low-precision GEMMs,
    # "upcast" float32 GEMMs on exactly upcast operands (faster on CPUs without bfloat16 dot instructions), "auto"
    # picks by backend and CPU features.
    low_precision_matmul: LowPrecisionMatmul = "auto"
    # Recompute everything but the plain (non-batched) matmuls in the backward: less memory traffic, and the
    # fastest train step on CPU in benchmarks/variants.py (configs A and B, scanned blocks, fp32 and bf16).
    remat: Literal["none", "block", "dots"] = "dots"
    scan_blocks: bool = True

    def __post_init__(self):
        for name, hint in _choice_fields().items():  # typos like remat="blocks" fail here, not deep in a trace
            value = getattr(self, name)
            if hint is bool and not isinstance(value, bool):
                raise ConfigError(name, f"must be true or false, got {value!r}")
            if hint is not bool and value not in typing.get_args(hint):
                raise ConfigError(name, f"must be one of {typing.get_args(hint)}, got {value!r}")
        positive = ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "chunk_size",
                    "ffn_round_up_to_multiple_of")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "norm_eps", "cell_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.qk_dim <= 0 or self.qk_dim % self.num_heads:
            raise ConfigError(
                "qk_dim_factor",
                f"qk dim embedding_dim*qk_dim_factor = {self.qk_dim} must be a positive multiple of "
                f"num_heads = {self.num_heads}",
            )
        if self.v_dim <= 0 or self.v_dim % self.num_heads:
            raise ConfigError(
                "v_dim_factor",
                f"v dim embedding_dim*v_dim_factor = {self.v_dim} must be a positive multiple of "
                f"num_heads = {self.num_heads}",
            )
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            cap = getattr(self, name)
            if cap is not None and cap <= 0:
                raise ConfigError(name, f"must be positive or null, got {cap}")

    @property
    def qk_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: ``embedding_dim * ffn_proj_factor`` rounded up to the multiple."""
        multiple = self.ffn_round_up_to_multiple_of
        return multiple * math.ceil(self.embedding_dim * self.ffn_proj_factor / multiple)


@functools.cache
def _choice_fields() -> dict[str, object]:
    """The fields of ModelConfig typed with a Literal (their hint) or as bool."""
    hints = typing.get_type_hints(ModelConfig)
    return {name: hint for name, hint in hints.items() if hint is bool or typing.get_origin(hint) is Literal}
