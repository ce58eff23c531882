"""Logits and states against transformers' ``xLSTMForCausalLM`` (its own pure-torch kernels).

Recipe of the model spec §8: a tiny xLSTM-7B-shaped model, seed 0, HF init then perturbed so gates,
norms and the head are far from their defaults; saved with ``save_pretrained`` and loaded through
:func:`load_hf_checkpoint`. The reference is the HF model run in float64 (parallel form: "train"
mode with chunk_size = T) with every norm reduction in float64; our float32 model must match it on
every kernel and on token-by-token decoding.
"""

import copy
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
modeling_xlstm = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")

from xlstm_eqx.models.hf_interop import export_hf_checkpoint, load_hf_checkpoint  # noqa: E402

V, D, NH, L, B, T = 100, 128, 2, 2, 2, 48
LOGIT_ATOL = 2e-4  # float32 vs float64 on logits with |logits| up to ~20
STATE_RTOL = 1e-5  # max |ours - ref| / max |ref|, per state tensor


def hf_config(**overrides):
    """The spec §8 tiny config; "train" mode with chunk_size = T is the parallel form."""
    kwargs = dict(
        vocab_size=V, hidden_size=D, embedding_dim=D, num_hidden_layers=L, num_blocks=L, num_heads=NH,
        qk_dim_factor=0.5, v_dim_factor=1.0, use_bias=False, norm_eps=1e-6, norm_reduction_force_float32=True,
        add_out_norm=True, eps=1e-6, ffn_proj_factor=2.667, ffn_round_up_to_multiple_of=64,
        gate_soft_cap=15.0, output_logit_soft_cap=30.0, weight_mode="single", tie_word_embeddings=False,
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native", return_last_states=True, autocast_kernel_dtype="float32",
        inference_state_dtype="float32", max_inference_chunksize=16384, mode="train", chunk_size=T,
    )  # fmt: skip
    return transformers.xLSTMConfig(**{**kwargs, **overrides})


def perturb(model):
    """Spec §8 perturbation. Beyond it, the output-gate weights (zero under HF init, which would hide
    any mistake in their mapping) get N(0, 1/sqrt(D))."""
    with torch.no_grad():
        for block in model.backbone.blocks:
            layer = block.mlstm_layer
            for gate in (layer.igate_preact, layer.fgate_preact):
                gate.weight.normal_(0.0, 3.0 / math.sqrt(D))
            layer.igate_preact.bias.normal_(0.0, 1.0)
            layer.fgate_preact.bias.copy_(torch.linspace(3.0, 6.0, NH) + 0.5 * torch.randn(NH))
            layer.ogate_preact.weight.normal_(0.0, 1.0 / math.sqrt(D))
            for norm in (block.norm_mlstm, block.norm_ffn, layer.multihead_norm):
                norm.weight.copy_(1.0 + 0.2 * torch.randn_like(norm.weight))
        out_norm = model.backbone.out_norm
        out_norm.weight.copy_(1.0 + 0.2 * torch.randn_like(out_norm.weight))
        model.lm_head.weight.normal_(0.0, 5.0 / math.sqrt(D))


def hf_states(cache):
    """Per-layer (C (B, NH, DK, DV), n (B, NH, DK), m (B, NH)) from an ``xLSTMCache``, as numpy."""
    return [
        tuple(x.numpy() for x in cache.rnn_state[i][:2]) + (cache.rnn_state[i][2][..., 0].numpy(),) for i in range(L)
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    assert modeling_xlstm.external_xlstm is False, "transformers must use its own kernels (uninstall `xlstm`)"
    torch.manual_seed(0)
    model = transformers.xLSTMForCausalLM(hf_config()).eval()
    perturb(model)
    tokens = torch.randint(0, V, (B, T))
    path = tmp_path_factory.mktemp("hf_checkpoint")
    model.save_pretrained(path)

    # float64 reference: HF forces float32 norm reductions (its out_norm ignores the config flag) and
    # casts logits to float32 before the soft cap, so switch the former off and apply the head here.
    ref = copy.deepcopy(model).double()
    for module in ref.modules():
        if hasattr(module, "force_float32_reductions"):
            module.force_float32_reductions = False
    with torch.no_grad():
        out = ref.backbone(tokens, use_cache=True)
        logits = 30.0 * torch.tanh(ref.lm_head(out.last_hidden_state) / 30.0)
        hf32 = model(tokens).logits
    return dict(
        path=path, model=model, tokens=tokens.numpy().astype(np.int32), logits=logits.numpy(),
        states=hf_states(out.cache), hf32_logits=hf32.numpy(),
    )  # fmt: skip


@eqx.filter_jit
def run_whole(model, tokens):
    return jax.vmap(model)(tokens)


@eqx.filter_jit
def run_pieces(model, tokens, split):
    """Prefill ``tokens[:split]`` in one call, then decode the rest one token at a time (split=0: all)."""

    def one(seq):
        state = model.init_state()
        prefix = []
        if split:
            logits, state = model(seq[:split], state)
            prefix = [logits]

        def step(state, token):
            logits, state = model(token[None], state)
            return state, logits[0]

        state, logits = jax.lax.scan(step, state, seq[split:])
        return jnp.concatenate([*prefix, logits]), state

    return jax.vmap(one)(tokens)


def check(reference, logits, state):
    logits = np.asarray(logits)
    assert logits.dtype == np.float32 and logits.shape == (B, T, V)
    err = np.max(np.abs(logits - reference["logits"]))
    assert err < LOGIT_ATOL, f"max abs logit error {err:.3g}"
    for layer, ref_state in enumerate(reference["states"]):
        for name, ours, ref in zip("Cnm", state, ref_state, strict=True):
            ours = np.asarray(ours[:, layer])
            assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
            rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
            assert rel < STATE_RTOL, f"layer {layer} {name}: relative state error {rel:.3g}"
    return err


def test_reference_is_sane(reference):
    """The HF float32 run agrees with the float64 one: the reference harness itself is right."""
    assert np.abs(reference["logits"]).max() > 5.0  # perturbed: logits far from uniform
    assert np.max(np.abs(reference["hf32_logits"] - reference["logits"])) < LOGIT_ATOL
    m = np.stack([s[2] for s in reference["states"]])
    assert np.abs(m).max() > 1.0  # stabiliser active: states are not trivially small


@pytest.mark.parametrize(
    "kernel, chunk_size",
    [("parallel", 64), ("chunkwise", 8), ("chunkwise", 20), ("chunkwise", 48), ("recurrent", 64)],
)
def test_whole_sequence(reference, kernel, chunk_size):
    model = load_hf_checkpoint(reference["path"], kernel=kernel, chunk_size=chunk_size)
    assert model.config.param_dtype == "float32" and model.config.compute_dtype == "float32"
    check(reference, *run_whole(model, jnp.asarray(reference["tokens"])))


@pytest.mark.parametrize("split", [0, 40], ids=["token_by_token", "prefill_then_step"])
def test_decoding_with_carried_state(reference, split):
    model = load_hf_checkpoint(reference["path"], kernel="chunkwise", chunk_size=16)
    check(reference, *run_pieces(model, jnp.asarray(reference["tokens"]), split))


@pytest.mark.parametrize(
    "kernel, chunk_size, split",
    [("parallel", 64, None), ("chunkwise", 20, None), ("chunkwise", 16, 40)],
    ids=["parallel", "chunkwise20", "prefill_then_step"],
)
def test_float64_model_is_exact(reference, x64, kernel, chunk_size, split):
    """Run in float64, our model reproduces the float64 reference to rounding: the float32 errors
    above are float32 rounding only, not a difference in the math."""
    model = load_hf_checkpoint(
        reference["path"],
        kernel=kernel,
        chunk_size=chunk_size,
        param_dtype="float64",
        compute_dtype="float64",
    )
    tokens = jnp.asarray(reference["tokens"])
    logits, state = run_whole(model, tokens) if split is None else run_pieces(model, tokens, split)
    assert logits.dtype == jnp.float64
    assert np.max(np.abs(np.asarray(logits) - reference["logits"])) < 1e-10
    for layer, ref_state in enumerate(reference["states"]):
        for ours, ref in zip(state, ref_state, strict=True):
            assert np.max(np.abs(np.asarray(ours[:, layer]) - ref)) < 1e-12 * np.max(np.abs(ref))


def test_export_loads_in_transformers(reference, tmp_path):
    """Our export of the loaded model is read by transformers with identical tensors and logits."""
    export_hf_checkpoint(load_hf_checkpoint(reference["path"]), tmp_path)
    hf, info = transformers.xLSTMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = reference["model"].state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    hf.config.mode, hf.config.chunk_size = "train", T
    with torch.no_grad():
        logits = hf.eval()(torch.from_numpy(reference["tokens"]).long()).logits.numpy()
    np.testing.assert_array_equal(logits, reference["hf32_logits"])


@pytest.mark.parametrize("dims", [dict(embedding_dim=64), dict(embedding_dim=128, v_dim_factor=0.75)])
def test_an_export_whose_dims_transformers_cache_cannot_hold_generates_in_transformers(tmp_path, dims):
    """transformers' xLSTMCache rounds the qk and v dims up to 64: a qk dim of 32 (or a v dim of 96) is exported
    with use_cache false, so transformers' default generate() runs, and greedily continues a prompt as our
    recurrent decoding does."""
    from xlstm_eqx.config import ModelConfig
    from xlstm_eqx.models import build
    from xlstm_eqx.models.generate import generate_jit

    model = build(ModelConfig(vocab_size=V, num_blocks=2, num_heads=NH, **dims), key=jax.random.key(3))
    export_hf_checkpoint(model, tmp_path)
    hf = transformers.xLSTMForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.use_cache is False and (model.config.qk_dim, model.config.v_dim) in [(32, 64), (64, 96)]
    prompt = np.array([0, 5, 17, 42, 8], np.int32)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt[None]).long(), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
    ours = generate_jit(model, jnp.asarray(prompt), 6, key=jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_fused_transformers_checkpoint(reference, tmp_path):
    """A weight_mode="fused" HF model with the same weights loads to the same parameters."""
    single = reference["model"]
    # transformers' own init crashes for weight_mode="fused" (bias shapes in _init_weights); skip it.
    with transformers.initialization.no_init_weights():
        fused = transformers.xLSTMForCausalLM(hf_config(weight_mode="fused")).eval()
    state = single.state_dict()
    with torch.no_grad():
        for name, tensor in fused.state_dict().items():
            prefix, _, leaf = name.rpartition(".")
            parts = {
                "qkv_opreact": ["q", "k", "v", "ogate_preact"],
                "ifgate_preact": ["igate_preact", "fgate_preact"],
                "proj_up_gate_z": ["proj_up_gate", "proj_up"],
            }.get(prefix.rpartition(".")[2])
            if parts is None:
                tensor.copy_(state[name])
            else:
                parent = prefix.rpartition(".")[0]
                tensor.copy_(torch.cat([state[f"{parent}.{p}.{leaf}"] for p in parts]))
        # Same math, but fused GEMMs round differently in float32: compare with the float64 reference.
        logits = fused(torch.from_numpy(reference["tokens"]).long()).logits.numpy()
        assert np.max(np.abs(logits - reference["logits"])) < LOGIT_ATOL
    fused.save_pretrained(tmp_path)
    ours_fused, ours_single = load_hf_checkpoint(tmp_path), load_hf_checkpoint(reference["path"])
    for a, b in zip(jax.tree.leaves(ours_fused), jax.tree.leaves(ours_single), strict=True):
        np.testing.assert_array_equal(a, b)
