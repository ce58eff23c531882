"""Parameter counts of the presets equal transformers' for the same model (built on the meta device)."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from xlstm_eqx.config import load_config  # noqa: E402
from xlstm_eqx.models import count_params  # noqa: E402
from xlstm_eqx.models.hf_config import _hf_ffn_width, model_config_to_hf  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def hf_model(**config):
    with torch.device("meta"):  # shapes only: nothing is allocated
        return transformers.xLSTMForCausalLM(transformers.xLSTMConfig(**config))


@pytest.mark.parametrize(
    "preset, expected",
    [("xlstm_v1_165m", 164_073_312), ("xlstm_v1_1.3b", 1_420_839_104), ("xlstm_v1_7b", 6_865_424_896)],
)
def test_param_count_matches_transformers(preset, expected):
    config = load_config(CONFIGS / f"{preset}.yaml").model
    hf = hf_model(**model_config_to_hf(config))
    assert count_params(config) == hf.num_parameters() == expected
    assert hf.backbone.blocks[0].ffn.up_proj_dim == config.ffn_hidden_dim


@pytest.mark.parametrize("preset", ["xlstm_v1_165m", "xlstm_v1_1.3b", "xlstm_v1_7b"])
def test_transformers_ffn_rounding(preset):
    """transformers rounds the FFN width by floor-dividing a float: 768 · 2.667 gives 2048, where
    ModelConfig (and xlstm-jax) ceil to 2112; 1.3B and 7B agree. ``model_config_to_hf`` therefore
    adjusts ``ffn_proj_factor`` for the 165M preset; this pins down the rounding it compensates for."""
    config = load_config(CONFIGS / f"{preset}.yaml").model
    nominal = {**model_config_to_hf(config), "ffn_proj_factor": config.ffn_proj_factor}
    width = hf_model(**nominal).backbone.blocks[0].ffn.up_proj_dim
    assert width == _hf_ffn_width(config.embedding_dim, config.ffn_proj_factor, config.ffn_round_up_to_multiple_of)
    assert (width == config.ffn_hidden_dim) == (preset != "xlstm_v1_165m")


def test_7b_preset_is_transformers_default():
    """transformers' default xLSTMConfig is the released xLSTM-7B; no mapping involved."""
    assert count_params(load_config(CONFIGS / "xlstm_v1_7b.yaml").model) == hf_model().num_parameters()
