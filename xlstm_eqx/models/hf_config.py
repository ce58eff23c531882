"""Mapping between transformers' ``xLSTMConfig`` (config.json) and our :class:`ModelConfig`.

Field names mostly coincide; ``eps`` is our ``cell_eps``; the multi-head norm is LayerNorm. transformers
rounds the FFN width differently (``_hf_ffn_width``): export writes a factor that gives our width on both sides.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..config import ModelConfig

SUPPORTED_DTYPES = ("float32", "bfloat16", "float64")

# transformers' xLSTMConfig defaults for the fields that shape the model (used when a key is absent).
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=50304,
    hidden_size=4096,
    num_hidden_layers=32,
    num_heads=8,
    use_bias=False,
    add_out_norm=True,
    tie_word_embeddings=False,
    norm_eps=1e-6,
    qk_dim_factor=0.5,
    v_dim_factor=1.0,
    chunk_size=64,
    eps=1e-6,
    ffn_proj_factor=2.667,
    ffn_round_up_to_multiple_of=64,
    gate_soft_cap=15.0,
    output_logit_soft_cap=30.0,
    weight_mode="single",
)
HF_CACHE_MULTIPLE = 64  # transformers' xLSTMCache rounds the qk and v head dims up to this
# Fields that only steer transformers' torch execution: ignored on load, written with these values (use_cache is
# written by model_config_to_hf: true only where transformers' cache fits the model).
_HF_EXECUTION: dict[str, Any] = dict(
    norm_reduction_force_float32=True,
    chunkwise_kernel="chunkwise--native_autograd",
    step_kernel="native",
    sequence_kernel="native_sequence__native",
    mode="inference",
    return_last_states=True,
    inference_state_dtype="float32",
    max_inference_chunksize=16384,
    # the shipped tokenizer's ids: EOD (<|endoftext|>, 0) starts and ends documents, <pad> is 1
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=0,
)
_SAME_NAME = (
    "vocab_size",
    "num_heads",
    "qk_dim_factor",
    "v_dim_factor",
    "ffn_round_up_to_multiple_of",
    "use_bias",
    "norm_eps",
    "gate_soft_cap",
    "output_logit_soft_cap",
    "tie_word_embeddings",
    "chunk_size",
)


def _hf_ffn_width(dim: int, factor: float, multiple: int) -> int:
    """transformers' ``round_up_to_next_multiple_of(dim * factor, multiple)``: it floor-divides the
    *float* ``dim*factor + multiple - 1``, so e.g. D 768, 2.667 gives 2048 where we ceil to 2112."""
    return int(((dim * factor + multiple - 1) // multiple) * multiple)


def _consistent_ffn_factor(dim: int, factor: float, multiple: int, width: int) -> float:
    """``factor`` if both roundings give FFN ``width``; else a factor for which both do."""
    for f in (factor, width / dim, (width - 0.5) / dim, float(np.nextafter(width / dim, 0.0))):
        if _hf_ffn_width(dim, f, multiple) == width == multiple * math.ceil(dim * f / multiple):
            return f
    raise ValueError(f"ffn_proj_factor: no factor gives FFN width {width} under both roundings (D={dim})")


def _pick(hf: dict[str, Any], names: tuple[str, str], default: Any) -> Any:  # aliased fields
    values = {hf[n] for n in names if hf.get(n) is not None}
    if len(values) > 1:
        raise ValueError(f"{names[0]}/{names[1]}: conflicting values {hf[names[0]]} and {hf[names[1]]}")
    return values.pop() if values else default


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers ``xLSTMConfig`` dict (e.g. a parsed ``config.json``).

    Absent fields take transformers' defaults; ``eps`` maps to ``cell_eps``; the multi-head norm is
    LayerNorm; the param dtype is the config's ``dtype``/``torch_dtype`` when supported. Execution-only
    fields (``mode``, kernels, token ids, …) are ignored. Raises ValueError naming the field for what
    our model cannot represent (another ``model_type``, ``add_out_norm`` false, an unknown ``weight_mode``).
    """
    if hf_config.get("model_type", "xlstm") != "xlstm":
        raise ValueError(f"model_type: expected 'xlstm', got {hf_config['model_type']!r}")
    hf = {**_HF_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None or "soft_cap" in k}}
    if hf["weight_mode"] not in ("single", "fused"):
        raise ValueError(f"weight_mode: expected 'single' or 'fused', got {hf['weight_mode']!r}")
    if not hf["add_out_norm"]:
        raise ValueError("add_out_norm: false is not supported (our model always applies the final RMSNorm)")
    dim = _pick(hf_config, ("hidden_size", "embedding_dim"), _HF_DEFAULTS["hidden_size"])
    blocks = _pick(hf_config, ("num_hidden_layers", "num_blocks"), _HF_DEFAULTS["num_hidden_layers"])
    multiple = hf["ffn_round_up_to_multiple_of"]
    width = _hf_ffn_width(dim, hf["ffn_proj_factor"], multiple)
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    fields = {name: hf[name] for name in _SAME_NAME}
    for name, value in fields.items():  # JSON may write 15.0 as 15
        default = getattr(ModelConfig, name)
        if value is not None and isinstance(default, bool | int | float):
            fields[name] = type(default)(value)
    return ModelConfig(
        **fields,
        embedding_dim=dim,
        num_blocks=blocks,
        ffn_proj_factor=_consistent_ffn_factor(dim, hf["ffn_proj_factor"], multiple, width),
        cell_eps=float(hf["eps"]),
        cell_norm_type="layernorm",
        **({"param_dtype": dtype} if dtype in SUPPORTED_DTYPES else {}),
    )


def model_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A complete transformers ``xLSTMConfig`` dict (``weight_mode`` "single") for ``config``.

    ``ffn_proj_factor`` changes only where transformers' rounding would give another FFN width.
    Raises ValueError naming the field transformers cannot represent (rmsnorm head norm, no soft cap).
    """
    c = config
    if c.cell_norm_type != "layernorm":
        raise ValueError(f"cell_norm_type: transformers' xLSTM uses 'layernorm', got {c.cell_norm_type!r}")
    for name in ("gate_soft_cap", "output_logit_soft_cap"):
        if getattr(c, name) is None:
            raise ValueError(f"{name}: transformers' xLSTMConfig requires a number, got None")
    return {
        "model_type": "xlstm",
        "architectures": ["xLSTMForCausalLM"],
        **{name: getattr(c, name) for name in _SAME_NAME},
        "hidden_size": c.embedding_dim,
        "embedding_dim": c.embedding_dim,
        "num_hidden_layers": c.num_blocks,
        "num_blocks": c.num_blocks,
        "ffn_proj_factor": _consistent_ffn_factor(
            c.embedding_dim, c.ffn_proj_factor, c.ffn_round_up_to_multiple_of, c.ffn_hidden_dim
        ),
        "eps": c.cell_eps,
        "add_out_norm": True,
        "weight_mode": "single",
        "autocast_kernel_dtype": c.compute_dtype if c.compute_dtype in ("float32", "bfloat16") else "float32",
        "dtype": c.param_dtype,
        **_HF_EXECUTION,
        # transformers' xLSTMCache sizes its memory with the qk and v dims rounded up to 64, which breaks decoding
        # with a cache (transformers' default) for any other dims: such a model is written to decode without one
        "use_cache": c.qk_dim % HF_CACHE_MULTIPLE == 0 and c.v_dim % HF_CACHE_MULTIPLE == 0,
    }
