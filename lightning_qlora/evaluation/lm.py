"""`LightningLM`: an lm-eval `TemplateLM` that scores a live (Lightning) causal LM in place.

The behaviour mirrors `lm_eval.models.huggingface.HFLM` for decoder-only models (tokenization, BOS handling,
context/continuation splitting, left truncation, batching order, logits caching, stop sequences), so numbers match
HFLM on the same weights. Unlike HFLM it never moves, casts or copies the model and it puts every submodule back in
the train/eval mode it found it in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    DEFAULT_MAX_LENGTH,
    Collator,
    has_bos_prefix,
    resolve_max_length,
)
from tqdm import tqdm

from lightning_qlora.evaluation.generation import GenerationMixin
from lightning_qlora.evaluation.tasks import EvaluationError

log = logging.getLogger(__name__)

_Request = tuple[tuple[str, str] | None, list[int], list[int]]


def _unwrap(module_or_model: Any, tokenizer: Any) -> tuple[Any, Any, Any]:
    """Return `(root, model, tokenizer)`: `root` owns the train/eval modes, `model` is what gets called."""
    from lightning.pytorch import LightningModule

    inner = getattr(module_or_model, "model", None)
    # a transformers *ForCausalLM also has `.model` (its backbone), so require `.tokenizer` or a LightningModule
    if inner is not None and (hasattr(module_or_model, "tokenizer") or isinstance(module_or_model, LightningModule)):
        model = inner
        tokenizer = tokenizer if tokenizer is not None else getattr(module_or_model, "tokenizer", None)
    else:
        model = module_or_model
    if not callable(model):
        raise EvaluationError(f"model {type(model).__name__} is not callable; pass a causal LM or a module with .model")
    if tokenizer is None:
        raise EvaluationError(
            f"no tokenizer for {type(module_or_model).__name__}; pass tokenizer=... or give the module a .tokenizer"
        )
    return module_or_model, model, tokenizer


def _infer_device(root: Any, model: Any) -> torch.device:
    for obj in (root, model):
        dev = getattr(obj, "device", None)
        if isinstance(dev, torch.device):
            return dev
    for obj in (model, root):
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                return p.device
    return torch.device("cpu")


class LightningLM(GenerationMixin, TemplateLM):
    """lm-eval model adapter around a live causal LM (e.g. `lightning_qlora.models.causal_lm.CausalLM`).

    Args:
        module_or_model: a module exposing `.model` (called as `model(input_ids=..., attention_mask=...)` and
            returning `.logits`) and `.tokenizer`, or such a causal LM itself (then pass `tokenizer`).
        tokenizer: overrides the module's tokenizer.
        batch_size: requests per forward pass.
        max_length: context window in tokens; default from the model config like HFLM (else 2048).
        device: where inputs go; default the module's device. The model itself is never moved.
        add_bos_token: as in HFLM: `None` keeps the tokenizer's own behaviour, `True`/`False` force it.
        logits_cache: reuse one forward for requests sharing context + continuation[:-1] (HFLM default).
        max_gen_toks: default generation budget when a task does not set one.
    """

    backend = "causal"

    def __init__(
        self,
        module_or_model: Any,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        add_bos_token: bool | None = None,
        *,
        logits_cache: bool = True,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        self._root, self._model, self.tokenizer = _unwrap(module_or_model, tokenizer)
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise EvaluationError(f"batch_size={batch_size!r} is not an integer; pass a positive int") from None
        if batch_size < 1:
            raise EvaluationError(f"batch_size={batch_size} must be >= 1")
        self._batch_size = batch_size
        self._max_length = max_length
        self._device = torch.device(device) if device is not None else _infer_device(self._root, self._model)
        self.add_bos_token = add_bos_token
        self.logits_cache = logits_cache
        self._max_gen_toks = int(max_gen_toks)
        self._warned_truncation = False

    @property
    def model(self) -> Any:
        """The wrapped causal LM (called, never copied)."""
        return self._model

    @property
    def eot_token_id(self) -> int:
        """End-of-text id: the tokenizer's EOS, like HFLM."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Token used as context for empty contexts and rolling windows: BOS, else EOS (HFLM's rule)."""
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Context window in tokens."""
        if self._max_length:
            return int(self._max_length)
        return resolve_max_length(getattr(self._model, "config", None), self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        """Default number of generated tokens."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Requests per forward pass."""
        return self._batch_size

    @property
    def device(self) -> torch.device:
        """Device the inputs are placed on."""
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """Tokenizer fingerprint for lm-eval's chat-template caches."""
        return str(getattr(self.tokenizer, "name_or_path", "") or "tokenizer").replace("/", "__")

    @property
    def pad_token_id(self) -> int:
        """Padding id for batched generation; the tokenizer is not modified (HFLM's fallback order)."""
        ids = (getattr(self.tokenizer, n, None) for n in ("pad_token_id", "unk_token_id", "eos_token_id"))
        return int(next((i for i in ids if i is not None), 0))

    def get_model_info(self) -> dict:
        """Small, offline model description for lm-eval's results `config`."""
        info: dict[str, Any] = {"model_class": type(self._model).__name__}
        if isinstance(self._model, torch.nn.Module):
            info["model_num_parameters"] = sum(p.numel() for p in self._model.parameters())
            info["model_dtype"] = str(getattr(self._model, "dtype", ""))
        return info

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode + no_grad; afterwards every submodule gets its previous train/eval mode back (even on error)."""
        root = self._root if isinstance(self._root, torch.nn.Module) else self._model
        if not isinstance(root, torch.nn.Module):
            with torch.no_grad():
                yield
            return
        saved = [(m, m.training) for m in root.modules()]
        root.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            # `train()` (not `.training = ...`) so layers that override it run their hooks; pre-order fix-up keeps
            # submodules that were deliberately in a different mode than their parent.
            root.train(saved[0][1])
            for module, mode in saved:
                if module.training != mode:
                    module.train(mode)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        """Encode like `HFLM.tok_encode` (tokenizer's own special tokens unless `add_bos_token` is set)."""
        special = self._special_kwargs(add_special_tokens)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def _special_kwargs(self, add_special_tokens: bool | None = None) -> dict[str, bool]:
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        return {} if flag is None else {"add_special_tokens": flag}

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        """Decode token ids."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _batch_encode(self, strings: list[str], left_truncate_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded batch encoding with HFLM's `tok_batch_encode` special-token rule (decided on strings[0])."""
        bos_prefixed = has_bos_prefix(strings[0], getattr(self.tokenizer, "bos_token", None))
        special = {"add_special_tokens": False} if bos_prefixed else self._special_kwargs()
        encoded = [self.tokenizer.encode(s, **special) for s in strings]
        if left_truncate_len:
            if max(len(e) for e in encoded) > left_truncate_len:
                log.warning("Left truncation applied: keeping the last %d tokens of the prompt.", left_truncate_len)
            encoded = [e[-left_truncate_len:] for e in encoded]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            if e:
                ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
                mask[i, width - len(e) :] = 1
        return ids, mask

    def _model_call(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self._model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]

    def _loglikelihood_tokens(
        self, requests: list[_Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        """Score continuations; same sorting, grouping, truncation and slicing as `HFLM._loglikelihood_tokens`."""
        res: list[tuple[float, bool]] = []

        def _collate(req: _Request) -> tuple[int, tuple[int, ...]]:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _lookup_one_token_cont(req: _Request) -> list[int]:
            return req[-2] + req[-1][:-1]

        re_ord = Collator(
            requests,
            sort_fn=_collate,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_lookup_one_token_cont,
        )
        chunks = re_ord.get_batched(n=self.batch_size)
        max_length = self.max_length
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        with self._inference():
            for chunk in chunks:
                inps: list[list[int]] = []
                for _, context_enc, continuation_enc in chunk:
                    if not context_enc or not continuation_enc:
                        raise EvaluationError("empty context or continuation after tokenization; check the task")
                    if len(continuation_enc) > max_length:
                        raise EvaluationError(
                            f"continuation of {len(continuation_enc)} tokens exceeds max_length={max_length}"
                        )
                    if len(context_enc) + len(continuation_enc) > max_length + 1 and not self._warned_truncation:
                        self._warned_truncation = True
                        log.warning(
                            "Context + continuation exceed max_length=%d; truncating from the left.", max_length
                        )
                    inps.append((context_enc + continuation_enc)[-(max_length + 1) :][:-1])

                padding_len = max(len(x) for x in inps)
                ids = torch.zeros((len(inps), padding_len), dtype=torch.long)  # right padding with 0, like HFLM
                mask = torch.zeros((len(inps), padding_len), dtype=torch.long)
                for i, x in enumerate(inps):
                    ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
                    mask[i, : len(x)] = 1
                logits_all = self._model_call(ids.to(self.device), mask.to(self.device))

                for (request_str, ctx_tokens, cont_tokens), logits_row, inp in zip(chunk, logits_all, inps):
                    ctx_len = len(inp) + (logits_row.shape[0] - padding_len)
                    # log_softmax (fp32) over the scored positions only: same values as HFLM, far less memory
                    scored = logits_row[ctx_len - len(cont_tokens) : ctx_len].float()
                    logprobs = F.log_softmax(scored, dim=-1).unsqueeze(0)  # [1, seq, vocab]
                    greedy_tokens = logprobs.argmax(dim=-1)
                    for req_str, cont, lp in re_ord.get_cache(
                        req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_tokens, logits=logprobs
                    ):
                        cont_t = torch.tensor(cont, dtype=torch.long, device=lp.device).unsqueeze(0)
                        is_greedy = bool((greedy_tokens[:, -cont_t.shape[1] :] == cont_t).all())
                        score = torch.gather(lp, 2, cont_t.unsqueeze(-1)).squeeze(-1)
                        answer = (float(score.sum()), is_greedy)
                        res.append(answer)
                        if req_str is not None:
                            self.cache_hook.add_partial("loglikelihood", req_str, answer)
                        pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Full-document log-likelihood with HFLM's disjoint rolling windows (perplexity tasks)."""
        all_windows: list[tuple[int, _Request]] = []
        counts: list[int] = []
        for req_idx, (string,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm)):
            windows = [
                (None, *lm_utils.make_disjoint_window(w))
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            all_windows.extend((req_idx, w) for w in windows)
            counts.append(len(windows))

        scores: list[float] = []
        for i in range(0, len(all_windows), self.batch_size):
            batch = [w for _, w in all_windows[i : i + self.batch_size]]
            scores.extend(s for s, _ in self._loglikelihood_tokens(batch, disable_tqdm=True, override_bs=len(batch)))

        starts = [sum(counts[:i]) for i in range(len(counts))]
        results = [sum(scores[a : a + n]) for a, n in zip(starts, counts)]
        for req, total in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return results

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a few-shot chat history with the tokenizer's chat template (as HFLM does)."""
        import jinja2

        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
        kwargs["continue_final_message"] = not add_generation_prompt
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            log.warning("Chat template failed; retrying without the system message.")
            chat_history = [m for m in chat_history if m["role"] != "system"]
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
