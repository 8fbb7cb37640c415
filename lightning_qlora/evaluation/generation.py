"""Generation for :class:`~lightning_qlora.evaluation.lm.LightningLM`: lm-eval's ``generate_until`` as HFLM does it.

Batched by generation kwargs, longest context first; ``model.generate`` with lm-eval's stop-sequence criteria when the
model has it, else a plain greedy/temperature loop without KV cache.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from lightning_qlora.evaluation.tasks import EvaluationError
from lightning_qlora.utils.imports import lm_eval as optional_lm_eval


class GenerationMixin:
    """``generate_until`` for an lm-eval ``TemplateLM``.

    The host class provides ``_model``, ``tokenizer``, ``_batch_encode``, ``_model_call`` and ``_inference``.
    """

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Batched generation until a stop string / EOS / `max_gen_toks` (HFLM semantics, greedy by default)."""
        res: list[str] = []

        def _collate(req: tuple[str, dict]) -> tuple[int, str]:
            return -len(self.tok_encode(req[0])), req[0]

        re_ords = Collator([r.args for r in requests], sort_fn=_collate, group_by="gen_kwargs", group_fn=lambda x: x[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        with self._inference():
            for chunk in re_ords.get_batched(n=self.batch_size):
                contexts, all_gen_kwargs = zip(*chunk)
                gen_kwargs = all_gen_kwargs[0]
                if not isinstance(gen_kwargs, dict):
                    raise EvaluationError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
                kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen_toks = int(kwargs.pop("max_gen_toks"))
                max_ctx_len = self.max_length - max_gen_toks
                if max_ctx_len <= 0:
                    raise EvaluationError(
                        f"max_gen_toks={max_gen_toks} must be smaller than max_length={self.max_length}"
                    )
                context_enc, attn_mask = self._batch_encode(list(contexts), left_truncate_len=max_ctx_len)
                context_enc, attn_mask = context_enc.to(self.device), attn_mask.to(self.device)
                max_length = kwargs.pop("max_length", context_enc.shape[1] + max_gen_toks)
                generated = self._generate(context_enc, attn_mask, until, max_length, kwargs)
                for cont_toks, context in zip(generated, contexts):
                    text = self.tok_decode(cont_toks)
                    text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    res.append(text)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                    pbar.update(1)
        pbar.close()
        return re_ords.get_original(res)

    def _generate(
        self, context: torch.Tensor, attention_mask: torch.Tensor, stop: list[str], max_length: int, kwargs: dict
    ) -> list[list[int]]:
        """New tokens per row: `model.generate` called as HFLM does, or a plain loop for models without it."""
        kwargs = dict(kwargs)
        kwargs["temperature"] = kwargs.get("temperature", 0.0)
        do_sample = kwargs.get("do_sample")
        if (temp := kwargs.get("temperature")) == 0.0 and do_sample is None:
            kwargs["do_sample"] = do_sample = False
        if do_sample is False and temp == 0.0:
            kwargs.pop("temperature", None)
        if hasattr(self._model, "generate"):
            stop_sequences_criteria = optional_lm_eval("models.utils_hf").stop_sequences_criteria

            criteria = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
            out = self._model.generate(
                input_ids=context,
                attention_mask=attention_mask,
                max_length=max_length,
                stopping_criteria=criteria,
                pad_token_id=self.pad_token_id,
                use_cache=True,
                **kwargs,
            )
            return [row[context.shape[1] :] for row in out.tolist()]
        return self._decode_loop(context, attention_mask, stop, max_length - context.shape[1], kwargs)

    def _decode_loop(
        self, context: torch.Tensor, attention_mask: torch.Tensor, stop: list[str], max_new: int, kwargs: dict
    ) -> list[list[int]]:
        """Greedy (or temperature) decoding without KV cache, one unpadded sequence at a time."""
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        sample = bool(kwargs.get("do_sample")) and temperature > 0.0
        results = []
        for row, mask in zip(context, attention_mask):
            ids = row[mask.bool()].unsqueeze(0)
            new: list[int] = []
            while len(new) < max_new:
                logits = self._model_call(ids, torch.ones_like(ids))[:, -1, :].float()
                if sample:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
                else:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                ids = torch.cat([ids, nxt.to(ids.device)], dim=1)
                new.append(int(nxt))
                if new[-1] == self.eot_token_id:
                    break
                tail = self.tokenizer.decode(new)
                if any(s and s in tail for s in stop):
                    break
            results.append(new)
        return results
