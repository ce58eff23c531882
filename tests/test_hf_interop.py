"""transformers-format checkpoints without torch: bit-exact round trips, config mapping, clear errors."""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from xlstm_eqx.config import ModelConfig, load_config
from xlstm_eqx.models import build
from xlstm_eqx.models.hf_interop import (
    export_hf_checkpoint,
    load_hf_checkpoint,
    model_config_from_hf,
    model_config_to_hf,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(vocab_size=50, embedding_dim=64, num_blocks=2, num_heads=2)


def random_model(key, **overrides):
    """A tiny model with every parameter (biases and norm weights included) random, so no mapping
    mistake can hide behind zeros or ones. Built from shapes only (no init to compile)."""
    skeleton = eqx.filter_eval_shape(build, ModelConfig(**{**TINY, **overrides}), key=key)
    shapes, static = eqx.partition(skeleton, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype)), shapes)
    return eqx.combine(params, static)


def assert_bit_equal(a, b):
    pa, pb = eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert a.config == b.config


def rewrite(directory, edit_tensors=None, edit_config=None):
    """Edits an exported checkpoint in place."""
    if edit_tensors is not None:
        tensors = load_file(directory / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((directory / "config.json").read_text())
        edit_config(config)
        (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"use_bias": True}, {"param_dtype": "bfloat16"}],
    ids=["plain", "tied", "bias", "bf16"],
)
def test_load_export_load_is_bit_exact(tmp_path, getkey, overrides):
    original = random_model(getkey(), **overrides)
    export_hf_checkpoint(original, tmp_path / "a")
    loaded = load_hf_checkpoint(tmp_path / "a")
    assert_bit_equal(original, loaded)
    export_hf_checkpoint(loaded, tmp_path / "b")
    assert_bit_equal(loaded, load_hf_checkpoint(tmp_path / "b"))
    files_a, files_b = (
        load_file(tmp_path / "a/model.safetensors"),
        load_file(tmp_path / "b/model.safetensors"),
    )
    assert sorted(files_a) == sorted(files_b)
    assert all(files_a[n].tobytes() == files_b[n].tobytes() for n in files_a)
    assert (tmp_path / "a/config.json").read_text() == (tmp_path / "b/config.json").read_text()


def test_layout_matches_transformers_names_and_shapes(tmp_path, getkey):
    model = random_model(getkey(), use_bias=True)
    export_hf_checkpoint(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    c = model.config
    assert tensors["backbone.embeddings.weight"].shape == (50, 64)
    assert tensors["lm_head.weight"].shape == (50, 64)
    assert tensors["backbone.blocks.1.mlstm_layer.q.weight"].shape == (c.qk_dim, 64)
    assert tensors["backbone.blocks.1.ffn.proj_down.weight"].shape == (64, c.ffn_hidden_dim)
    np.testing.assert_array_equal(tensors["backbone.blocks.1.mlstm_layer.q.bias"], model.blocks.mlstm_layer.q.bias[1])
    # Head-major flattening of the (NH, DV) multi-head norm weight.
    flat = tensors["backbone.blocks.1.mlstm_layer.multihead_norm.weight"]
    np.testing.assert_array_equal(
        flat[c.v_head_dim : 2 * c.v_head_dim], model.blocks.mlstm_layer.multihead_norm.norms.weight[1, 1]
    )
    # transformers' norms have biases under use_bias, ours not: written as zeros.
    assert not tensors["backbone.blocks.0.norm_ffn.bias"].any()
    assert "backbone.out_norm.bias" not in tensors


def test_loaded_model_runs_like_the_original(tmp_path, getkey):
    original = random_model(getkey())
    export_hf_checkpoint(original, tmp_path)
    loaded = load_hf_checkpoint(tmp_path, kernel="parallel", chunk_size=16)
    assert loaded.config.kernel == "parallel" and loaded.config.chunk_size == 16
    tokens = jnp.arange(20, dtype=jnp.int32) % 50
    np.testing.assert_array_equal(original(tokens, kernel="parallel")[0], loaded(tokens)[0])


def test_sharded_checkpoint(tmp_path, getkey):
    model = random_model(getkey())
    export_hf_checkpoint(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {n: file for file, shard in shards.items() for n in shard}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_bit_equal(model, load_hf_checkpoint(tmp_path))


def test_fused_weight_mode_is_split(tmp_path, getkey):
    model = random_model(getkey(), use_bias=True)
    export_hf_checkpoint(model, tmp_path)

    def fuse(tensors):
        for i in range(2):
            p = f"backbone.blocks.{i}."
            for kind in ("weight", "bias"):
                parts = {
                    "mlstm_layer.qkv_opreact": [
                        "mlstm_layer.q",
                        "mlstm_layer.k",
                        "mlstm_layer.v",
                        "mlstm_layer.ogate_preact",
                    ],
                    "mlstm_layer.ifgate_preact": ["mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"],
                    "ffn.proj_up_gate_z": ["ffn.proj_up_gate", "ffn.proj_up"],
                }
                for fused, singles in parts.items():
                    tensors[f"{p}{fused}.{kind}"] = np.concatenate([tensors.pop(f"{p}{s}.{kind}") for s in singles])

    rewrite(tmp_path, fuse, lambda c: c.update(weight_mode="fused"))
    assert_bit_equal(model, load_hf_checkpoint(tmp_path))
    rewrite(
        tmp_path,
        lambda t: t.update({"backbone.blocks.0.ffn.proj_up_gate_z.weight": np.zeros((5, 64), np.float32)}),
    )
    with pytest.raises(
        ValueError, match=r"backbone\.blocks\.0\.ffn\.proj_up_gate_z\.weight: expected leading dimension"
    ):
        load_hf_checkpoint(tmp_path)


def test_param_dtype_override_casts(tmp_path, getkey):
    model = random_model(getkey(), param_dtype="bfloat16")
    export_hf_checkpoint(model, tmp_path)
    loaded = load_hf_checkpoint(tmp_path, param_dtype="float32")
    assert loaded.config.param_dtype == "float32"
    assert loaded.lm_head.weight.dtype == jnp.float32
    np.testing.assert_array_equal(loaded.lm_head.weight, model.lm_head.weight.astype(jnp.float32))


@pytest.mark.parametrize("preset", ["tiny", "xlstm_v1_165m", "xlstm_v1_1.3b", "xlstm_v1_7b", "bench_a"])
def test_config_round_trip(preset):
    config = load_config(CONFIGS / f"{preset}.yaml").model
    hf = model_config_to_hf(config)
    assert hf["model_type"] == "xlstm" and hf["weight_mode"] == "single" and hf["add_out_norm"] is True
    assert hf["hidden_size"] == hf["embedding_dim"] == config.embedding_dim
    assert hf["num_hidden_layers"] == hf["num_blocks"] == config.num_blocks
    back = model_config_from_hf(json.loads(json.dumps(hf)))
    assert back.ffn_hidden_dim == config.ffn_hidden_dim
    if preset == "xlstm_v1_165m":
        # transformers' float floor division would give 2048 for 768 * 2.667; ours ceils to 2112.
        assert config.ffn_hidden_dim == 2112 and hf["ffn_proj_factor"] == 2112 / 768
        config = ModelConfig(**{**config.__dict__, "ffn_proj_factor": hf["ffn_proj_factor"]})
    assert back == config


def test_config_fields_map():
    hf = {
        "model_type": "xlstm",
        "vocab_size": 100,
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_heads": 4,
        "qk_dim_factor": 0.25,
        "v_dim_factor": 0.5,
        "use_bias": True,
        "norm_eps": 1e-5,
        "eps": 1e-4,
        "gate_soft_cap": 10,
        "output_logit_soft_cap": 20.0,
        "tie_word_embeddings": True,
        "chunk_size": 32,
        "ffn_proj_factor": 2.0,
        "ffn_round_up_to_multiple_of": 32,
        "dtype": "bfloat16",
        "mode": "train",
    }
    c = model_config_from_hf(hf)
    assert (c.vocab_size, c.embedding_dim, c.num_blocks, c.num_heads) == (100, 128, 3, 4)
    assert (c.qk_dim, c.v_dim, c.ffn_hidden_dim, c.chunk_size) == (32, 64, 256, 32)
    assert c.use_bias and c.tie_word_embeddings and c.cell_norm_type == "layernorm"
    assert (c.norm_eps, c.cell_eps, c.gate_soft_cap, c.output_logit_soft_cap) == (1e-5, 1e-4, 10.0, 20.0)
    assert isinstance(c.gate_soft_cap, float) and c.param_dtype == "bfloat16"
    # Absent fields take transformers' defaults: the released xLSTM-7B.
    assert model_config_from_hf({}) == load_config(CONFIGS / "xlstm_v1_7b.yaml").model
    assert model_config_from_hf({"embedding_dim": 256, "num_blocks": 4}).embedding_dim == 256
    # transformers' own rounding of the FFN width is kept (768 * 2.667 -> 2048).
    assert model_config_from_hf({"hidden_size": 768, "num_heads": 4}).ffn_hidden_dim == 2048


@pytest.mark.parametrize(
    "hf, message",
    [
        ({"weight_mode": "blocked"}, "weight_mode: expected 'single' or 'fused'"),
        ({"add_out_norm": False}, "add_out_norm: false is not supported"),
        ({"model_type": "llama"}, "model_type: expected 'xlstm'"),
        (
            {"hidden_size": 128, "embedding_dim": 256},
            "hidden_size/embedding_dim: conflicting values 128 and 256",
        ),
        ({"num_hidden_layers": 2, "num_blocks": 3}, "num_hidden_layers/num_blocks: conflicting"),
        ({"hidden_size": 100, "num_heads": 3}, "qk_dim_factor"),
    ],
)
def test_unsupported_hf_config(hf, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(hf)


def test_unrepresentable_config_for_transformers():
    with pytest.raises(ValueError, match="cell_norm_type: transformers' xLSTM uses 'layernorm'"):
        model_config_to_hf(ModelConfig(**TINY, cell_norm_type="rmsnorm"))
    with pytest.raises(ValueError, match="gate_soft_cap: transformers' xLSTMConfig requires a number"):
        model_config_to_hf(ModelConfig(**TINY, gate_soft_cap=None))


@pytest.fixture
def checkpoint(tmp_path, getkey):
    export_hf_checkpoint(random_model(getkey(), use_bias=True), tmp_path)
    return tmp_path


def test_missing_tensor(checkpoint):
    rewrite(checkpoint, lambda t: t.pop("backbone.blocks.1.mlstm_layer.k.weight"))
    with pytest.raises(
        ValueError,
        match=r"missing tensor backbone\.blocks\.1\.mlstm_layer\.k\.weight \(expected shape \(32, 64\)\)",
    ):
        load_hf_checkpoint(checkpoint)


def test_wrong_shape(checkpoint):
    rewrite(
        checkpoint,
        lambda t: t.update({"backbone.blocks.0.mlstm_layer.multihead_norm.weight": np.ones(63, np.float32)}),
    )
    with pytest.raises(ValueError, match=r"multihead_norm\.weight: expected shape \(64,\), checkpoint has \(63,\)"):
        load_hf_checkpoint(checkpoint)


def test_unexpected_tensor(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"backbone.blocks.2.norm_ffn.weight": np.ones(64, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor backbone\.blocks\.2\.norm_ffn\.weight \(shape \(64,\)\)"):
        load_hf_checkpoint(checkpoint)


def test_config_shape_mismatch_names_tensor(checkpoint):
    rewrite(checkpoint, edit_config=lambda c: c.update(qk_dim_factor=0.25))
    with pytest.raises(
        ValueError,
        match=r"blocks\.0\.mlstm_layer\.q\.weight: expected shape \(16, 64\), checkpoint has \(32, 64\)",
    ):
        load_hf_checkpoint(checkpoint)


def test_nonzero_norm_bias_is_rejected(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"backbone.blocks.1.norm_mlstm.bias": np.full(64, 0.5, np.float32)}))
    with pytest.raises(
        ValueError, match=r"backbone\.blocks\.1\.norm_mlstm\.bias: nonzero, but our model has no norm biases"
    ):
        load_hf_checkpoint(checkpoint)


def test_untied_head_under_tied_config_is_rejected(checkpoint):
    rewrite(checkpoint, edit_config=lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="lm_head.weight: differs from backbone.embeddings.weight"):
        load_hf_checkpoint(checkpoint)
    assert load_hf_checkpoint(checkpoint, tie_word_embeddings=False).lm_head is not None


def test_mixed_dtypes_and_bad_overrides(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"lm_head.weight": t["lm_head.weight"].astype(np.float16)}))
    with pytest.raises(ValueError, match=r"param_dtype: checkpoint tensors are \['float16', 'float32'\]"):
        load_hf_checkpoint(checkpoint)
    assert load_hf_checkpoint(checkpoint, param_dtype="float32").lm_head.weight.dtype == jnp.float32
    with pytest.raises(ValueError, match="overrides:.*no_such_field"):
        load_hf_checkpoint(checkpoint, param_dtype="float32", no_such_field=1)


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_checkpoint(tmp_path)


def test_special_token_ids_are_the_tokenizers(tmp_path, getkey):
    """transformers' generate stops at eos_token_id: it must be the EOD id, not GPT-NeoX's 2 (here '!')."""
    from xlstm_eqx.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load()
    export_hf_checkpoint(random_model(getkey()), tmp_path / "default")
    written = json.loads((tmp_path / "default" / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (
        tokenizer.eod_id, tokenizer.eod_id, tokenizer.pad_id
    )  # fmt: skip
    model = random_model(getkey(), vocab_size=tokenizer.vocab_size, embedding_dim=16)
    export_hf_checkpoint(model, tmp_path / "given", tokenizer=tokenizer, pad_token_id=7)
    written = json.loads((tmp_path / "given" / "config.json").read_text())
    assert (written["eos_token_id"], written["pad_token_id"]) == (tokenizer.eod_id, 7)  # explicit fields win
    with pytest.raises(ValueError, match="vocab"):
        export_hf_checkpoint(random_model(getkey()), tmp_path / "small", tokenizer=tokenizer)
