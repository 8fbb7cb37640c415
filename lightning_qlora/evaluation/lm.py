"""`LightningLM`: lm-eval's own `HFLM`, run in place over a live (Lightning) causal LM.

Scoring, batching, tokenization and generation are HFLM's code, so numbers match HFLM on the same weights. Only
what must differ is overridden: the constructor (HFLM's calls `model.eval()` and `model.tie_weights()` and may set a
pad token on the caller's tokenizer), train/eval mode (eval + no_grad for each call, then every submodule gets its
own mode back), the input device (taken from the module, never by moving it) and black-box models without
`.generate` / `.config`. The model is never moved, cast, copied or re-tied.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import DEFAULT_MAX_LENGTH, configure_pad_token, normalize_gen_kwargs, resolve_max_length

from lightning_qlora.evaluation.tasks import EvaluationError

log = logging.getLogger(__name__)


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


def _with_pad_token(tokenizer: Any, config: Any) -> Any:
    """The tokenizer itself when it has a pad token, else a padded copy (HFLM would set one on the caller's)."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return tokenizer
    return configure_pad_token(copy.deepcopy(tokenizer), model_config=config)


class LightningLM(HFLM):
    """lm-eval `HFLM` over a live causal LM (e.g. `lightning_qlora.models.causal_lm.CausalLM`), used in place.

    Args:
        module_or_model: a module exposing `.model` (called as `model(input_ids)` and returning `.logits`) and
            `.tokenizer`, or such a causal LM itself (then pass `tokenizer`).
        tokenizer: overrides the module's tokenizer.
        batch_size: requests per forward pass.
        max_length: context window in tokens; default from the model config like HFLM (else 2048).
        device: where inputs go; default the module's device. The model itself is never moved.
        add_bos_token: as in HFLM: `None` keeps the tokenizer's own behaviour, `True`/`False` force it.
        logits_cache: reuse one forward for requests sharing context + continuation[:-1] (HFLM default).
        max_gen_toks: default generation budget when a task does not set one.
        softmax_dtype: HFLM's `softmax_dtype` for the log-softmax; float32 by default (HFLM's `None` keeps the
            logits' dtype, i.e. bf16 log-likelihoods for a bf16 model).
    """

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
        softmax_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        # HFLM.__init__ is skipped on purpose (it calls `model.eval()` and `model.tie_weights()`, and may give the
        # caller's tokenizer a pad token); the attributes its methods read are set here, as for a pre-built model.
        super(HFLM, self).__init__()
        self._root, self._model, tokenizer = _unwrap(module_or_model, tokenizer)
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise EvaluationError(f"batch_size={batch_size!r} is not an integer; pass a positive int") from None
        if batch_size < 1:
            raise EvaluationError(f"batch_size={batch_size} must be >= 1")
        self._config = getattr(self._model, "config", None)
        self.backend = "causal"
        self.tokenizer = _with_pad_token(tokenizer, self._config)
        self._device = torch.device(device) if device is not None else _infer_device(self._root, self._model)
        self.batch_size_per_gpu = batch_size
        self._max_length = max_length
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.logits_cache = logits_cache
        self.softmax_dtype = softmax_dtype
        self.mixed_precision_dtype = None
        self.truncation = False
        self.custom_prefix_token_id = None
        self.think_end_token = None
        self.enable_thinking = None
        self.chat_template_args = {}
        self.vocab_size = getattr(self.tokenizer, "vocab_size", None)
        self.pretrained = self._model
        self.revision = self.peft = self.delta = None
        self.batch_schedule, self.batch_sizes, self.max_batch_size = 1, {}, batch_size

    @property
    def max_length(self) -> int:
        """Context window in tokens (also for models without `.config`)."""
        if self._max_length:
            return int(self._max_length)
        return resolve_max_length(self._config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        """Default number of generated tokens."""
        return self._max_gen_toks

    def get_model_info(self) -> dict:
        """Small, offline model description for lm-eval's results `config` (HFLM's queries the hub)."""
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

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """HFLM's, in eval mode; train/eval modes are restored afterwards."""
        with self._inference():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """HFLM's, in eval mode; train/eval modes are restored afterwards."""
        with self._inference():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """HFLM's, in eval mode, after checking every request's budget fits `max_length`."""
        for _, gen_kwargs in (r.args for r in requests):
            if not isinstance(gen_kwargs, dict):
                raise EvaluationError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
            max_gen_toks = int(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)["max_gen_toks"])
            if max_gen_toks >= self.max_length:
                raise EvaluationError(f"max_gen_toks={max_gen_toks} must be smaller than max_length={self.max_length}")
        with self._inference():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def tok_batch_encode(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """HFLM's; the live tokenizer's `padding_side` is put back even if tokenization fails."""
        side = self.tokenizer.padding_side
        try:
            return super().tok_batch_encode(*args, **kwargs)
        finally:
            self.tokenizer.padding_side = side

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        """HFLM's `model.generate` call, or a plain decoding loop for models without `.generate`."""
        if hasattr(self.model, "generate"):
            return super()._model_generate(context, max_length, stop, **kwargs)
        return self._decode_loop(context, kwargs.get("attention_mask"), stop, max_length - context.shape[1], kwargs)

    def _decode_loop(
        self, context: torch.Tensor, attention_mask: torch.Tensor | None, stop: list[str], max_new: int, kwargs: dict
    ) -> torch.Tensor:
        """Greedy (or temperature) decoding without KV cache, one unpadded row at a time.

        Returns `[context | new]` rows, finished rows padded with EOS (dropped by `tok_decode`), like `generate`.
        """
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        sample = bool(kwargs.get("do_sample")) and temperature > 0.0
        mask = attention_mask if attention_mask is not None else torch.ones_like(context)
        rows: list[list[int]] = []
        for row, row_mask in zip(context, mask):
            ids = row[row_mask.bool()].unsqueeze(0)
            new: list[int] = []
            while len(new) < max_new:
                logits = self._model_call(ids)[:, -1, :].float()
                if sample:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
                else:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                ids = torch.cat([ids, nxt.to(ids.device)], dim=1)
                new.append(int(nxt))
                if new[-1] == self.eot_token_id or any(s and s in self.tokenizer.decode(new) for s in stop):
                    break
            rows.append(new)
        out = torch.full((len(rows), max(map(len, rows), default=0)), self.eot_token_id, dtype=torch.long)
        for i, new in enumerate(rows):
            out[i, : len(new)] = torch.tensor(new, dtype=torch.long)
        return torch.cat([context, out.to(context.device)], dim=1)
