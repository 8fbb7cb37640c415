"""Text generation with transformers' ``generate``: left-padded prompt batches, KV cache, greedy or sampled, streamed.

The decoding itself (greedy argmax, temperature and top-p sampling, the KV cache, stop strings) is transformers'
``generate``; this module only builds its arguments, pads prompt batches on the left (so every row's last prompt token
sits in the last column and new tokens follow it), cuts each completion at its end-of-sequence token or first stop
string, and streams text through transformers' ``TextIteratorStreamer``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationOptions:
    """How to decode: greedy by default, sampling when ``temperature > 0``."""

    max_new_tokens: int = 256
    """Most tokens generated per prompt (fewer when the model's context window ends first)."""
    temperature: float = 0.0
    """0: greedy (the argmax token each step); > 0: sample from ``softmax(logits / temperature)``."""
    top_p: float = 1.0
    """Nucleus sampling: sample only from the most likely tokens whose probabilities add up to ``top_p`` (1: all)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation of a row ends at the first one, and its completion is cut just before it."""
    seed: int | None = None
    """Seed of the sampling random numbers (each batch reseeds with ``seed + batch index``); None: not reseeded."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: pass a whole number >= 1 (e.g. 256)")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ValueError(
                f"temperature={self.temperature!r}: pass a number from 0 to 100 (0 = greedy, e.g. 0.7 to sample)"
            )
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1 or math.isnan(self.top_p):
            raise ValueError(f"top_p={self.top_p!r}: pass a number in (0, 1] (1 = off)")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: pass a list of non-empty strings")
        if self.seed is not None and type(self.seed) is not int:
            raise ValueError(f"seed={self.seed!r}: pass a whole number or None")

    @property
    def sample(self) -> bool:
        """Whether tokens are sampled (``temperature > 0``) rather than chosen greedily."""
        return self.temperature > 0


@dataclass
class Completion:
    """One generated completion."""

    text: str
    """The new text, without the end-of-sequence token and cut before the first stop string."""
    token_ids: list[int]
    """The new tokens, up to (not including) the end-of-sequence token."""
    finish_reason: FinishReason
    """``"stop"``: an end-of-sequence token or a stop string ended it; ``"length"``: ``max_new_tokens`` did."""
    prompt_tokens: int
    """Tokens in the prompt (padding excluded)."""

    @property
    def completion_tokens(self) -> int:
        """Tokens generated (the end-of-sequence token excluded)."""
        return len(self.token_ids)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], add_special_tokens: bool) -> dict[str, torch.Tensor]:
    """Tokenize rendered prompts into one batch padded on the left.

    Args:
        tokenizer: a transformers tokenizer with a pad token.
        prompts: prompt texts, already rendered (chat template or Alpaca prompt).
        add_special_tokens: prepend the tokenizer's BOS as training did (True for Alpaca prompts; a chat template
            writes its own).

    Returns:
        ``input_ids`` and ``attention_mask`` (0 on the left padding).

    Raises:
        ValueError: for an empty list or an empty prompt.
    """
    if not prompts:
        raise ValueError("no prompts to encode; pass at least one prompt")
    encoded = tokenizer(
        list(prompts), padding=True, padding_side="left", add_special_tokens=add_special_tokens, return_tensors="pt"
    )
    lengths = encoded["attention_mask"].sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"prompt {int((lengths == 0).nonzero()[0])} is empty after tokenization; give it some text")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class PromptCollator:
    """``DataLoader`` collate function: items ``{"prompt": text, ...}`` → a left-padded batch for ``predict_step``.

    Args:
        tokenizer: the model's tokenizer.
        add_special_tokens: as for :func:`encode_prompts`.

    Returns (when called):
        ``input_ids``, ``attention_mask`` and ``rows`` (the items without their prompt text, copied into the
        predictions).
    """

    def __init__(self, tokenizer: Any, add_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Tokenize the items' prompts (left padding); keep their other fields as ``rows``."""
        batch: dict[str, Any] = encode_prompts(self.tokenizer, [i["prompt"] for i in items], self.add_special_tokens)
        batch["rows"] = [{k: v for k, v in item.items() if k != "prompt"} for item in items]
        return batch


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the model's generation config's and the tokenizer's (a chat model's end of turn)."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def context_window(config: Any) -> int | None:
    """A model config's context window in tokens (``max_position_embeddings`` or the like), None when it has none."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generate_kwargs(model: nn.Module, tokenizer: Any, options: GenerationOptions, prompt_length: int) -> dict:
    """The arguments of ``model.generate`` for ``options``: greedy or sampled, stop ids and strings, KV cache on.

    Raises:
        ValueError: if the prompt alone fills the model's context window.
    """
    max_new = options.max_new_tokens
    window = context_window(getattr(model, "config", None))
    if window is not None:
        if prompt_length >= window:
            raise ValueError(
                f"prompt of {prompt_length} tokens does not fit the model's context window of {window} tokens; "
                "shorten it"
            )
        max_new = min(max_new, window - prompt_length)
    eos = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new,
        "do_sample": options.sample,
        "num_beams": 1,
        "use_cache": True,
        "pad_token_id": pad,
        "eos_token_id": eos or None,
    }
    if options.sample:  # only top_p filters: the model's own top_k (often 50) is unset
        kwargs.update(temperature=float(options.temperature), top_p=float(options.top_p), top_k=None)
    else:  # greedy: the sampling settings of the model's generation_config are unset (none apply, none warn)
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if options.stop:
        kwargs.update(stop_strings=list(options.stop), tokenizer=tokenizer)
    return kwargs


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Reseed the random numbers inside the block, leaving the caller's random state as it was (``None``: as is)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def generate(
    model: nn.Module,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    options: GenerationOptions,
    seed: int | None = None,
) -> list[Completion]:
    """Complete a left-padded batch of prompts with ``model.generate`` (call it under ``torch.no_grad``).

    Args:
        model: a transformers causal LM (4-bit, adapted, any dtype).
        tokenizer: its tokenizer (decodes the completions; stop strings need it).
        input_ids: ``(batch, length)`` prompt ids, padded on the left (:func:`encode_prompts`).
        attention_mask: 1 on prompt tokens, 0 on padding.
        options: decoding options.
        seed: reseed the random numbers for this call (sampling only); None: ``options.seed``.

    Returns:
        One :class:`Completion` per row.

    Raises:
        ValueError: if the batch is padded on the right or a prompt fills the context window.
    """
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be padded on the left (the last column holds every row's last prompt token)")
    seed = options.seed if seed is None else seed
    lengths = attention_mask.sum(dim=1).tolist()
    window = context_window(getattr(model, "config", None))
    for row, length in enumerate(lengths):
        if window is not None and length >= window:
            raise ValueError(
                f"prompt {row} of the batch is {length} tokens but the model's context window is {window} tokens; "
                "shorten it"
            )
    # Each row may generate up to the window less its own prompt: rows that window cuts shorter than max_new_tokens
    # are generated apart (grouped by that budget), so no row's answer depends on the other prompts of its batch.
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        budget = options.max_new_tokens if window is None else min(options.max_new_tokens, window - length)
        groups.setdefault(budget, []).append(row)
    if len(groups) == 1:
        return _generate_batch(model, tokenizer, input_ids, attention_mask, options, seed)
    completions: list[Completion | None] = [None] * len(lengths)
    for rows in groups.values():
        width = max(lengths[r] for r in rows)  # the group's padding: its longest prompt
        ids, mask = input_ids[rows, -width:], attention_mask[rows, -width:]
        for row, completion in zip(rows, _generate_batch(model, tokenizer, ids, mask, options, seed)):
            completions[row] = completion
    return completions  # type: ignore[return-value]


def _generate_batch(
    model: nn.Module,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    options: GenerationOptions,
    seed: int | None,
) -> list[Completion]:
    """One ``model.generate`` call over a left-padded batch whose rows all get the same token budget."""
    device = model_device(model)
    kwargs = generate_kwargs(model, tokenizer, options, int(attention_mask.sum(dim=1).max()))
    with seeded(seed if options.sample else None, device):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    new = out[:, input_ids.shape[1] :].tolist()
    prompt_lengths = attention_mask.sum(dim=1).tolist()
    return [completion_of(tokenizer, row, options, kwargs, int(n)) for row, n in zip(new, prompt_lengths)]


def completion_of(
    tokenizer: Any, new: list[int], options: GenerationOptions, kwargs: dict, prompt_tokens: int
) -> Completion:
    """The :class:`Completion` of ``new`` (the tokens after the prompt): cut at end-of-sequence or the first stop."""
    eos = set(kwargs["eos_token_id"] or [])
    end = next((i for i, token in enumerate(new) if token in eos), None)
    ids = new if end is None else new[:end]
    while end is None and ids and ids[-1] == kwargs["pad_token_id"]:
        ids = ids[:-1]  # a row a stop string ended is padded to the batch's length
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = first_stop(text, options.stop)
    if cut is not None:
        text = text[:cut]
    reason: FinishReason = "stop" if end is not None or cut is not None else "length"
    return Completion(text=text, token_ids=ids, finish_reason=reason, prompt_tokens=prompt_tokens)


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


__all__ = [
    "Completion",
    "GenerationOptions",
    "context_window",
    "PromptCollator",
    "encode_prompts",
    "first_stop",
    "generate",
    "completion_of",
    "generate_kwargs",
    "model_device",
    "seeded",
]
