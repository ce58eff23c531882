"""An LM Evaluation Harness ``LM`` over an xlstm_eqx model and tokenizer.

``loglikelihood``: (log p(continuation | context), is_greedy), batched and sorted by length (lm-eval's
``TemplateLM`` splits context and continuation after tokenising the whole string, so BPE merges across the
border are handled). ``loglikelihood_rolling``: a whole document, either recurrently over chunks of
``infinite_eval_chunksize`` with the state carried (``use_infinite_eval``: every token sees the whole document)
or in disjoint windows of ``context_length`` whose context tokens are never scored. ``generate_until``: prefill
plus recurrent decoding, greedy or sampled (``temperature``, ``top_k``, ``top_p`` from the request's
gen_kwargs), cut at the first ``until`` string and at ``max_gen_toks``. Every context starts with the
end-of-document token, as every training document does.
"""

from __future__ import annotations

from typing import Any

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..data.tokenizer import Tokenizer, check_fits_model
from ..models.generate import generate_jit
from .scoring import score_continuations, score_document


class XlstmEqxLM(TemplateLM):
    """``model`` (an :class:`~xlstm_eqx.models.lm.xLSTMLM`) and ``tokenizer`` as an lm-eval model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        context_length: int = 2048,
        batch_size: int = 8,
        use_infinite_eval: bool = True,
        infinite_eval_chunksize: int = 64,
        max_gen_toks: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        check_fits_model(tokenizer, model.config.vocab_size)
        sizes = {"context_length": context_length, "batch_size": batch_size,
                 "infinite_eval_chunksize": infinite_eval_chunksize, "max_gen_toks": max_gen_toks}  # fmt: skip
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        self.model, self.xlstm_tokenizer = model, tokenizer
        self.context_length, self._batch_size = context_length, batch_size
        self.use_infinite_eval, self.chunk_size = use_infinite_eval, infinite_eval_chunksize
        self.max_gen_toks, self._key = max_gen_toks, jax.random.key(seed)

    @property
    def eot_token_id(self) -> int:
        return self.xlstm_tokenizer.eod_id

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
        return score_continuations(self.model, pairs, context_length=self.context_length, batch_size=self._batch_size)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            tokens = self.tok_encode(request.args[0])
            if not tokens:
                out.append(0.0)
            elif self.use_infinite_eval:
                out.append(score_document(self.model, tokens, eod_id=self.eot_token_id, chunk_size=self.chunk_size)[0])
            else:
                rolling = get_rolling_token_windows(
                    tokens, prefix_token=self.eot_token_id, max_seq_len=self.context_length, context_len=1
                )
                windows = [make_disjoint_window(window) for window in rolling]
                scores = score_continuations(
                    self.model, windows, context_length=self.context_length, batch_size=self._batch_size
                )
                out.append(sum(value for value, _ in scores))
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = gen_kwargs.pop("do_sample", None)
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample is not False else 0.0
            top_k, top_p = gen_kwargs.pop("top_k", None), gen_kwargs.pop("top_p", None)
            if gen_kwargs:  # refuse rather than silently ignore a sampling setting
                raise ValueError(f"generate_until: unsupported gen_kwargs {sorted(gen_kwargs)} in request {index}")
            prompt = self._with_eod(self.tok_encode(context))[-self.context_length :]
            tokens = generate_jit(
                self.model, jax.numpy.asarray(prompt, jax.numpy.int32), max_tokens,
                key=jax.random.fold_in(self._key, index), temperature=temperature, top_k=top_k, top_p=top_p,
                eod_id=self.eot_token_id,
            )  # fmt: skip
            tokens = [int(t) for t in jax.device_get(tokens)]
            if self.eot_token_id in tokens:
                tokens = tokens[: tokens.index(self.eot_token_id)]
            text = self.tok_decode(tokens)
            cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
            out.append(text[:cut])
        return out
