"""Streaming generation: text pieces as transformers' ``TextIteratorStreamer`` decodes them, cut at stop strings.

``generate`` runs on a worker thread (transformers' streamer is fed from ``generate``); :class:`TextStream` yields the
pieces and can cancel the run between tokens (Ctrl+C in ``chat``, a closed HTTP stream in ``serve``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lightning_qlora.models.generation import (
    Completion,
    GenerationOptions,
    completion_of,
    first_stop,
    generate_kwargs,
    model_device,
    seeded,
)


class StopStringFilter:
    """Pass streamed text through until a stop string; hold back a tail that could still become one.

    Streamed pieces cut words anywhere, so a stop string can arrive split over pieces: the longest end of the text
    that is a prefix of a stop string is kept back until the next piece says whether it is one.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = list(stop)
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the text that is now safe to show."""
        if self.stopped:
            return ""
        text = self.pending + piece
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.stopped, self.pending = True, ""
            return text[:cut]
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The text held back, once the stream has ended without a stop string."""
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest


class TextStream:
    """Generate one prompt's completion in a background thread and iterate over its text as it is produced.

    Iterating yields text pieces (transformers' ``TextIteratorStreamer``, stop strings held back and cut); after
    the loop :attr:`completion` holds the whole :class:`Completion` (finish reason, token counts). An error in
    generation is raised from the loop.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer.
        input_ids: ``(1, length)`` prompt ids.
        attention_mask: its attention mask.
        options: decoding options.
        context: a factory of the context the generating thread runs in (the precision plugin's autocast; the
            thread does not inherit the caller's), entered together with ``torch.inference_mode``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        options: GenerationOptions,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if input_ids.shape[0] != 1:
            raise ValueError(f"TextStream streams one prompt at a time, got a batch of {input_ids.shape[0]}")
        self.completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()

        class Cancelled(StoppingCriteria):  # generate checks it after every token
            def __call__(self, ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=ids.device)

        cancel = self._cancel
        self._stopping = StoppingCriteriaList([Cancelled()])
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._filter = StopStringFilter(options.stop)
        args = (model, tokenizer, input_ids, attention_mask, options, context)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True, name="lightning-qlora-generate")
        self._thread.start()

    def _run(self, model, tokenizer, input_ids, attention_mask, options, context) -> None:  # noqa: ANN001
        try:
            with torch.inference_mode(), context():
                device = model_device(model)
                kwargs = generate_kwargs(model, tokenizer, options, int(input_ids.shape[1]))
                with seeded(options.seed if options.sample else None, device):
                    out = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        streamer=self._streamer,
                        stopping_criteria=self._stopping,
                        **kwargs,
                    )
            new = out[0, input_ids.shape[1] :].tolist()
            self.completion = completion_of(tokenizer, new, options, kwargs, int(attention_mask.sum()))
        except BaseException as err:  # re-raised in the consumer's thread
            self._error = err
            self._streamer.end()  # unblock the consumer

    def cancel(self) -> None:
        """Stop generating after the current token (the loop then ends; :attr:`completion` holds what was made)."""
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        """Text pieces as they are generated (stop strings cut); raises what generation raised."""
        for piece in self._streamer:
            text = self._filter.feed(piece)
            if text:
                yield text
        self._thread.join()
        if self._error is not None:
            raise self._error
        rest = self._filter.flush()
        if rest:
            yield rest


__all__ = ["StopStringFilter", "TextStream"]
