"""Reading and writing transformers ``xLSTMForCausalLM`` checkpoints (``config.json`` + safetensors).

Names and layouts are transformers' (torch Linear weights are (out, in) like ``eqx.nn.Linear``: no
transposes). Per-block tensors ``backbone.blocks.{i}.…`` are stacked on the leading num_blocks axis of
``xLSTMLM.blocks``; the multi-head norm weight, stored head-major flat (NH·DV,), becomes (NH, DV).
Needs numpy and safetensors only. Differences handled: transformers' FFN width rounding (see
``hf_config``), its norm biases under ``use_bias`` (ours has none: must be zero), its untied head.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..config import ModelConfig
from ..data.tokenizer import Tokenizer, check_fits_model
from .hf_config import SUPPORTED_DTYPES, model_config_from_hf, model_config_to_hf
from .lm import xLSTMLM

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
_LINEARS = ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact", "out_proj")
_FUSED = {  # weight_mode "fused": fused module -> [(part, size attribute of ModelConfig)]
    "mlstm_layer.qkv_opreact": [("q", "qk_dim"), ("k", "qk_dim"), ("v", "v_dim"), ("ogate_preact", "v_dim")],
    "mlstm_layer.ifgate_preact": [("igate_preact", "num_heads"), ("fgate_preact", "num_heads")],
    "ffn.proj_up_gate_z": [("proj_up_gate", "ffn_hidden_dim"), ("proj_up", "ffn_hidden_dim")],
}
_FUSED_NAME = re.compile(r"^(backbone\.blocks\.\d+\.)(" + "|".join(map(re.escape, _FUSED)) + r")\.(\w+)$")


class _Param(NamedTuple):
    hf: str  # transformers' name; "{i}" stands for the block index
    path: str  # attribute path in xLSTMLM
    hf_shape: tuple[int, ...]  # per block for block parameters
    ours: bool  # False: only transformers has it (norm biases under use_bias); must be zero


def _get(tree: Any, path: str) -> Any:  # getattr along a dotted path; None propagates
    for attr in path.split("."):
        tree = None if tree is None else getattr(tree, attr)
    return tree


def _param_table(config: ModelConfig, skeleton: xLSTMLM) -> list[_Param]:
    """Every tensor of transformers' model for ``config``, with its place in ours (``skeleton``)."""
    b, d = config.use_bias, config.embedding_dim
    modules = [
        "norm_mlstm",
        *(f"mlstm_layer.{n}" for n in _LINEARS),
        "mlstm_layer.multihead_norm",
        "norm_ffn",
        "ffn.proj_up_gate",
        "ffn.proj_up",
        "ffn.proj_down",
    ]  # all with bias under use_bias
    block = [
        (f"{n}.{w}", w == "weight" or b or n.endswith(("igate_preact", "fgate_preact")))
        for n in modules
        for w in ("weight", "bias")
    ]
    names = [
        (f"backbone.blocks.{{i}}.{n}", "blocks." + n.replace("head_norm.", "head_norm.norms."), hf) for n, hf in block
    ]
    names += [
        ("backbone.embeddings.weight", "embedding.weight", True),
        ("backbone.out_norm.weight", "out_norm.weight", True),
    ]
    table = []
    for hf_name, path, in_hf in names:
        leaf = _get(skeleton, path)
        if not in_hf:
            if leaf is not None:
                raise ValueError(f"our model has {path}, which transformers' xLSTM lacks")
            continue
        if leaf is None:  # norm biases under use_bias
            table.append(_Param(hf_name, path, (config.v_dim if "multihead" in path else d,), False))
            continue
        shape = leaf.shape[1:] if hf_name.startswith("backbone.blocks") else leaf.shape
        table.append(_Param(hf_name, path, (math.prod(shape),) if "multihead" in path else shape, True))
    return table


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    if (directory / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    elif (directory / INDEX_FILE).exists():
        files = sorted(set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()))
    else:
        raise FileNotFoundError(f"neither {WEIGHTS_FILE} nor {INDEX_FILE} in {directory}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(directory / file, framework="np") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in tensors:
                    raise ValueError(f"{name}: stored in more than one shard")
                tensors[name] = f.get_tensor(name)
    return tensors


def _unfuse(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Splits weight_mode "fused" tensors ([q; k; v; o], [i; f], [gate; up]) into the "single" ones."""
    out = {}
    for name, x in tensors.items():
        match = _FUSED_NAME.match(name)
        if match is None:
            out[name] = x
            continue
        prefix, fused, kind = match.groups()
        parent, parts = fused.split(".")[0], _FUSED[fused]
        sizes = [getattr(config, attr) for _, attr in parts]
        if x.shape[0] != sum(sizes):
            raise ValueError(
                f"{name}: expected leading dimension {sum(sizes)} "
                f"({'+'.join(map(str, sizes))}), checkpoint has shape {x.shape}"
            )
        for (part, _), piece in zip(parts, np.split(x, np.cumsum(sizes)[:-1]), strict=True):
            out[f"{prefix}{parent}.{part}.{kind}"] = piece
    return out


def load_hf_checkpoint(path: str | Path, **overrides: Any) -> xLSTMLM:
    """Loads a transformers xLSTM checkpoint directory (``config.json`` + safetensors, sharded or not).

    ``overrides`` replace :class:`ModelConfig` fields (``kernel``, ``chunk_size``, ``compute_dtype``,
    ``param_dtype``, …). Parameters keep the checkpoint's dtype unless ``param_dtype`` is given.
    Every expected tensor must be present with its transformers shape, and nothing else; errors name
    the tensor. The model is assembled from shapes only, so no random init of a big model happens.
    """
    directory = Path(path)
    hf_config = json.loads((directory / CONFIG_FILE).read_text())
    config = model_config_from_hf(hf_config)
    tensors = _read_tensors(directory)
    if "param_dtype" not in overrides:
        dtypes = {str(x.dtype) for x in tensors.values()}
        if len(dtypes) != 1 or not dtypes <= set(SUPPORTED_DTYPES):
            raise ValueError(
                f"param_dtype: checkpoint tensors are {sorted(dtypes)}; pass param_dtype= one of {SUPPORTED_DTYPES}"
            )
        overrides = {**overrides, "param_dtype": dtypes.pop()}
    try:
        config = dataclasses.replace(config, **overrides)
    except TypeError as error:
        raise ValueError(f"overrides: {error}") from None
    if hf_config.get("weight_mode") == "fused":
        tensors = _unfuse(tensors, config)

    skeleton = eqx.filter_eval_shape(xLSTMLM, config, key=jax.random.key(0))
    table = _param_table(config, skeleton)
    expected = {p.hf.format(i=i): p.hf_shape for p in table for i in range(config.num_blocks)}
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        head, embed = tensors.pop("lm_head.weight"), tensors.get("backbone.embeddings.weight")
        if embed is None or head.shape != embed.shape or head.tobytes() != embed.tobytes():
            raise ValueError(
                "lm_head.weight: differs from backbone.embeddings.weight although "
                "tie_word_embeddings is true (transformers does not tie xLSTM heads); "
                "load with tie_word_embeddings=False"
            )
    elif not config.tie_word_embeddings:
        expected["lm_head.weight"] = (config.vocab_size, config.embedding_dim)
        table.append(_Param("lm_head.weight", "lm_head.weight", expected["lm_head.weight"], True))
    if missing := sorted(set(expected) - set(tensors)):
        raise ValueError(
            f"missing tensor {missing[0]} (expected shape {expected[missing[0]]}); {len(missing)} missing in all"
        )
    if unexpected := sorted(set(tensors) - set(expected)):
        raise ValueError(
            f"unexpected tensor {unexpected[0]} (shape {tensors[unexpected[0]].shape}); "
            f"{len(unexpected)} unexpected in all"
        )
    for name, shape in expected.items():
        if tensors[name].shape != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, checkpoint has {tensors[name].shape}")

    dtype = np.dtype(jnp.dtype(config.param_dtype))
    leaves = []
    for p in table:
        names = [p.hf.format(i=i) for i in range(config.num_blocks)] if "{i}" in p.hf else [p.hf]
        if not p.ours:
            if nonzero := [n for n in names if np.any(tensors[n])]:
                raise ValueError(
                    f"{nonzero[0]}: nonzero, but our model has no norm biases (use_bias "
                    "only adds biases to linear maps); only all-zero norm biases load"
                )
            continue
        target = _get(skeleton, p.path)
        arrays = [tensors[n].reshape(target.shape[1:] if "{i}" in p.hf else target.shape) for n in names]
        stacked = np.stack(arrays) if "{i}" in p.hf else arrays[0]
        leaves.append((p.path, jnp.asarray(stacked.astype(dtype, copy=False))))
    model = eqx.tree_at(lambda m: [_get(m, path) for path, _ in leaves], skeleton, [x for _, x in leaves])
    if left := [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]:
        raise RuntimeError(f"{len(left)} model parameters have no transformers tensor (mapping out of date)")
    return model


def export_hf_checkpoint(
    model: xLSTMLM, path: str | Path, *, tokenizer: Tokenizer | None = None, **hf_fields: Any
) -> None:
    """Writes ``config.json`` and ``model.safetensors`` that transformers' ``xLSTMForCausalLM`` loads.

    The special token ids are the ``tokenizer``'s (BOS = EOS = its EOD id, PAD its pad id); without one, those
    of the shipped tokenizer (EOD 0, pad 1), so that ``generate`` stops at the end of a document.
    ``hf_fields`` add to or replace ``config.json`` entries. A tied head is written
    as a copy of the embedding (transformers does not tie); norm biases of a ``use_bias`` model are
    written as zeros. Loading the result gives back ``model`` bit for bit. ``use_cache`` is written false (with a
    warning) where embedding_dim × qk_dim_factor or × v_dim_factor is not a multiple of 64, which transformers'
    xLSTMCache needs.
    """
    config, directory = model.config, Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        check_fits_model(tokenizer, config.vocab_size)
        ids = {"bos_token_id": tokenizer.eod_id, "eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.pad_id}
        hf_fields = {**ids, **hf_fields}
    hf_config = {**model_config_to_hf(config), **hf_fields}
    if not hf_config["use_cache"]:
        logging.getLogger(__name__).warning(
            "exported with use_cache=false: transformers' xLSTMCache needs the qk and v dims (embedding_dim times "
            "qk_dim_factor and v_dim_factor, here %d and %d) to be multiples of 64, so its generate() recomputes "
            "the whole sequence at every step",
            config.qk_dim,
            config.v_dim,
        )
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    tensors: dict[str, np.ndarray] = {}
    for p in _param_table(config, model):
        leaf = np.asarray(_get(model, p.path)) if p.ours else None
        for i in range(config.num_blocks) if "{i}" in p.hf else [None]:
            x = np.zeros(p.hf_shape, dtype) if leaf is None else (leaf if i is None else leaf[i])
            tensors[p.hf.format(i=i)] = np.ascontiguousarray(x.reshape(p.hf_shape))
    head = model.embedding.weight if model.lm_head is None else model.lm_head.weight
    tensors["lm_head.weight"] = np.array(head)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


__all__ = ["export_hf_checkpoint", "load_hf_checkpoint", "model_config_from_hf", "model_config_to_hf"]
