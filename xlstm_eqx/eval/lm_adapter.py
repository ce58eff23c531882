"""An LM Evaluation Harness ``LM`` over an xlstm_eqx model and tokenizer.

``loglikelihood``: (log p(continuation | context), is_greedy), scored by the sharded :class:`.scoring.Scorer`
(lm-eval's ``TemplateLM`` tokenises context + continuation together and splits them, so BPE merges across the
border are handled). With ``use_infinite_eval`` every request is one row evaluated recurrently in chunks of
``infinite_eval_chunksize`` (no context limit); otherwise rows of at most ``context_length`` inputs whose context
tokens are never scored. ``loglikelihood_rolling``: a whole document the same way. ``generate_until``: prefill
plus recurrent decoding, greedy or sampled (``temperature``, ``top_k``, ``top_p`` from the request's
gen_kwargs), cut at the first ``until`` string and at ``max_gen_toks``. Every context starts with the
end-of-document token, as every training document does. Chat templates are Jinja strings over the messages.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from lm_eval.api.model import TemplateLM

from ..data.tokenizer import Tokenizer, check_fits_model
from ..host_memory import configure_host_memory
from ..models.generate import generate_jit
from ..parallel.distributed import initialize, resolve
from .scoring import Scorer, ScoringSettings

# Role-tagged plain text: the bundled model was not chat-tuned, so any template is only a prompt format.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class XlstmEqxLM(TemplateLM):
    """``model`` (an :class:`~xlstm_eqx.models.lm.xLSTMLM`, its arrays sharded over ``mesh`` by the scorer)
    and ``tokenizer`` as an lm-eval model. ``token_loglikelihoods`` collects, per task, the Σ log-likelihood and
    token count of the rolling requests, from which :mod:`.lm_eval_run` derives token perplexities."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        settings: ScoringSettings | None = None,
        *,
        mesh: Mesh | None = None,
        fsdp_min_weight_size: int = 2**18,
        use_infinite_eval: bool = True,
        max_gen_toks: int = 256,
        seed: int = 0,
        chat_template: str | None = None,
        tokenizer_name: str = "xlstm_eqx",
    ):
        super().__init__()
        check_fits_model(tokenizer, model.config.vocab_size)
        if max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be ≥ 1, got {max_gen_toks}")
        self.scorer = Scorer(model, settings or ScoringSettings(), mesh, fsdp_min_weight_size)
        self.model, self.xlstm_tokenizer = model, tokenizer
        self.use_infinite_eval, self.max_gen_toks, self._key = use_infinite_eval, max_gen_toks, jax.random.key(seed)
        self._own_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._chat_template, self._tokenizer_name = self._own_template, tokenizer_name
        self.token_loglikelihoods: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def set_params(self, params: Any) -> None:
        """Evaluate these arrays (e.g. a later training state of the same model) with the compiled steps."""
        self.scorer.set_params(params)
        self.model = eqx.combine(params, eqx.filter(self.model, eqx.is_array, inverse=True))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> XlstmEqxLM:
        """lm-eval's CLI entry: ``checkpoint=RUN_DIR[,step=latest|best|N][,tokenizer=FILE][,data=N,fsdp=N]
        [,<LMEvalConfig field>=value…]`` (see :func:`~.lm_eval_run.lm_from_checkpoint`)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> XlstmEqxLM:
        """As :meth:`create_from_arg_string`, from a dict; the CLI's ``--batch_size N`` applies when the model
        args give none (``auto`` and ``device`` have no meaning here: JAX places the model on the mesh)."""
        from .lm_eval_run import NO_FORK, lm_from_checkpoint

        os.environ.update(NO_FORK)  # lm-eval's CLI process now runs JAX: its stderr bootstrap must not fork
        # lm-eval builds the model here (its CLI or simple_evaluate): our only process-level set-up point, as for
        # joining a run; $XLSTM_EQX_HOST_MEMORY=release opts out
        configure_host_memory()
        if not jax.distributed.is_initialized():  # one process of a multi-process run (XLSTM_EQX_* or SLURM)?
            initialize(resolve())
        args = dict(arg_dict)
        if "checkpoint" not in args:
            raise ValueError(f"--model_args needs checkpoint=RUN_DIR (got {sorted(args) or 'nothing'})")
        batch = (additional_config or {}).get("batch_size")
        if "batch_size" not in args and batch is not None and str(batch).isdigit():
            args["batch_size"] = int(batch)
        return lm_from_checkpoint(**args)

    @property
    def eot_token_id(self) -> int:
        return self.xlstm_tokenizer.eod_id

    @property
    def context_length(self) -> int:
        return self.scorer.settings.window

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """Selects and returns the Jinja template ``apply_chat_template`` renders: a string is the template
        itself, True the adapter's own (the constructor's, else :data:`DEFAULT_CHAT_TEMPLATE`)."""
        if chat_template:
            self._chat_template = chat_template if isinstance(chat_template, str) else self._own_template
        return self._chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment().from_string(self._chat_template)
        return template.render(messages=chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        del add_special_tokens, kwargs
        return self.xlstm_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.xlstm_tokenizer.decode(tokens)

    def _with_eod(self, context: list[int]) -> list[int]:
        return context if context[:1] == [self.eot_token_id] else [self.eot_token_id, *context]

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(self._with_eod(list(context)), list(continuation)) for _, context, continuation in requests]
        return self.scorer.score(pairs, recurrent=self.use_infinite_eval)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        documents = [self.tok_encode(request.args[0]) for request in requests]
        scored = [i for i, tokens in enumerate(documents) if tokens]
        values = self.scorer.score([([self.eot_token_id], documents[i]) for i in scored], self.use_infinite_eval)
        out = [0.0] * len(requests)
        for i, (value, _) in zip(scored, values):
            out[i] = value
            totals = self.token_loglikelihoods[getattr(requests[i], "task_name", None) or "unknown"]
            totals[0] += value
            totals[1] += len(documents[i])
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = _temperature(gen_kwargs.pop("do_sample", None), gen_kwargs.pop("temperature", None))
            top_k, top_p = gen_kwargs.pop("top_k", None), gen_kwargs.pop("top_p", None)
            top_k = None if top_k is not None and int(top_k) <= 0 else top_k  # 0 / -1: no top-k (HF, vLLM)
            if gen_kwargs:  # refuse rather than silently ignore a sampling setting
                raise ValueError(f"generate_until: unsupported gen_kwargs {sorted(gen_kwargs)} in request {index}")
            prompt = self._with_eod(self.tok_encode(context))
            if not self.use_infinite_eval:  # the recurrent prefill takes any length; windows do not
                prompt = prompt[-self.context_length :]
            prompt = bucketed_prompt(prompt, self.eot_token_id)
            tokens = generate_jit(
                self.model, jnp.asarray(prompt, jnp.int32), max_tokens, key=jax.random.fold_in(self._key, index),
                temperature=temperature, top_k=top_k, top_p=top_p, eod_id=self.eot_token_id,
            )  # fmt: skip
            tokens = [int(t) for t in multihost_utils.process_allgather(tokens, tiled=True)]
            if self.eot_token_id in tokens:
                tokens = tokens[: tokens.index(self.eot_token_id)]
            text = self.tok_decode(tokens)
            cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
            out.append(text[:cut])
        return out


def _temperature(do_sample: bool | None, temperature: float | None) -> float:
    """The sampling temperature a request's gen_kwargs ask for (0: greedy). ``do_sample=False`` is greedy whatever
    the temperature (lm-eval's defaults send it with ``temperature=0``); ``do_sample=True`` without a temperature
    samples at 1, as transformers' ``generate`` does; a temperature alone is used as given."""
    if do_sample is False:
        return 0.0
    if temperature is None:
        return 1.0 if do_sample else 0.0
    return float(temperature)


def bucketed_prompt(prompt: list[int], eod_id: int, smallest: int = 16) -> list[int]:
    """``prompt`` left-padded with EOD ids to a power of two (at least ``smallest``), so that prompts of many lengths
    share a few compiled generation programs instead of one each. Only a prompt that starts with EOD is padded:
    that EOD wipes the memory the pads wrote (exactly), so the continuation depends on the padding only through
    float rounding (the chunks align differently)."""
    if not prompt or prompt[0] != eod_id:
        return prompt
    size = max(smallest, 1 << (len(prompt) - 1).bit_length())
    return [eod_id] * (size - len(prompt)) + prompt
