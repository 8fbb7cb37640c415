"""``SampleAnswers``: after fine-tuning, answer a few held-out questions with the base model and the fine-tuned one."""

from __future__ import annotations

import contextlib
import textwrap
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_qlora.data.inference_prompts import (
    PromptRow,
    adds_special_tokens,
    read_prompt_rows,
    render_prompts,
    resolve_prompt_style,
)
from lightning_qlora.lora.layer import adapters_disabled
from lightning_qlora.models.generation import GenerationOptions, encode_prompts, generate
from lightning_qlora.utils.modules import model_root


class SampleAnswers(Callback):
    """Print the fine-tuned model's answers to held-out questions beside the base model's (adapters off).

    The answers are generated greedily when training ends (``on_train_end``, the model still on its device) and
    printed when fit ends, after the other callbacks' reports. The questions are the first rows of the data module's
    held-out split (an :class:`~lightning_qlora.InstructionDataModule`'s ``val_path``, or the rows ``val_split`` held
    out of ``path``), rendered with its prompt style and system prompt as in training; or ``questions``.

    Args:
        num_questions: how many held-out rows to answer.
        max_new_tokens: most tokens per answer (answers longer than this are cut, marked ``…``).
        questions: answer these instead of held-out rows.
        width: line width of the printed comparison.
    """

    def __init__(
        self, num_questions: int = 3, max_new_tokens: int = 32, questions: list[str] | None = None, width: int = 110
    ) -> None:
        if type(num_questions) is not int or num_questions < 1:
            raise ValueError(f"SampleAnswers num_questions={num_questions!r}: pass a whole number >= 1")
        self.options = GenerationOptions(max_new_tokens=max_new_tokens)
        self.num_questions = num_questions
        self.questions = list(questions) if questions else None
        self.width = width
        self.samples: list[dict[str, Any]] = []
        """One dict per question: ``question``, ``reference`` (held-out rows), ``base`` and ``fine_tuned`` answers."""

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Answer the questions with adapters on and off (rank zero; greedy, eval mode, modes restored after)."""
        if trainer.is_global_zero:
            self.samples = self.answer(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the comparison, last of the run's reports."""
        if self.samples:
            self._print()

    def rows(self, trainer: pl.Trainer) -> list[PromptRow]:
        """The questions: ``questions``, else the first held-out rows of the data module (file order)."""
        if self.questions:
            return [
                PromptRow([{"role": "user", "content": q}], f"question {i + 1}") for i, q in enumerate(self.questions)
            ]
        data = getattr(trainer, "datamodule", None)
        held_out = getattr(data, "val_dataset", None)
        if not held_out or not hasattr(data, "path"):
            rank_zero_warn("SampleAnswers: no held-out rows (use InstructionDataModule, or pass questions=[...])")
            return []
        wheres = {row["where"] for row in held_out}
        source = data.val_path or data.path
        rows = read_prompt_rows(source, getattr(data, "format", "auto"), getattr(data, "system_prompt", None))
        return [row for row in rows if row.where in wheres][: self.num_questions]

    def answer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        """Generate the base and fine-tuned answers to :meth:`rows`."""
        rows = self.rows(trainer)
        if not rows:
            return []
        tokenizer = pl_module.tokenizer
        data = getattr(trainer, "datamodule", None)
        style = resolve_prompt_style(tokenizer, getattr(data, "prompt_style", "chat_template"))
        prompts = render_prompts(tokenizer, [r.messages for r in rows], style, [r.where for r in rows])
        batch = encode_prompts(tokenizer, prompts, adds_special_tokens(tokenizer, style))
        model = model_root(pl_module)
        with _inference(pl_module), trainer.precision_plugin.forward_context():
            tuned = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], self.options)
            with adapters_disabled(model):
                base = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], self.options)
        return [
            {
                "question": next(m["content"] for m in reversed(row.messages) if m["role"] == "user"),
                "reference": row.reference,
                "base": _shown(b),
                "fine_tuned": _shown(t),
            }
            for row, b, t in zip(rows, base, tuned)
        ]

    @rank_zero_only
    def _print(self) -> None:
        tokens = self.options.max_new_tokens
        lines = [f"Held-out questions: the base model (adapters off) vs the fine-tuned one (greedy, ≤ {tokens} tokens)"]
        for i, sample in enumerate(self.samples, 1):
            lines.append(f"[{i}] {_one_line(sample['question'])}")
            shown = [("reference", sample["reference"]), ("base", sample["base"]), ("fine-tuned", sample["fine_tuned"])]
            for label, text in shown:
                if text is not None:
                    lines += textwrap.wrap(
                        _one_line(text) or "(empty)",
                        self.width,
                        initial_indent=f"    {label:>10}: ",
                        subsequent_indent=" " * 16,
                    )
        print("\n".join(lines), flush=True)


def _shown(completion: Any) -> str:
    return completion.text.strip() + (" …" if completion.finish_reason == "length" else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def _inference(module: torch.nn.Module) -> Any:
    """Eval mode and no gradients; afterwards every submodule gets its train/eval mode back through ``train()``."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(modes[0][1])
        for submodule, mode in modes:
            if submodule.training != mode:
                submodule.train(mode)


__all__ = ["SampleAnswers"]
