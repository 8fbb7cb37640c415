r"""``lightning-qlora generate``: complete a JSONL of prompts with the fine-tuned model through Lightning's ``predict``.

.. code-block:: bash

    lightning-qlora generate --config recipes/demo/smollm2-135m-faq.yaml --prompts questions.jsonl \\
        --output answers.jsonl --max_new_tokens 128

Rows are instruction (``instruction``/``input``) or chat (``messages``) rows as training reads them; an ``output`` or
final assistant turn is kept as ``reference``. Prompts are rendered as training rendered them (the recipe's
``prompt_style`` and ``system_prompt``), batched with left padding and completed by ``CausalLM.predict_step``
(transformers' ``generate``, KV cache, greedy unless ``--temperature`` > 0); ``JSONLPredictionWriter`` streams the
predictions into ``--output``, which appears complete or not at all.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser
from torch.utils.data import DataLoader

from lightning_qlora.callbacks.prediction_writer import JSONLPredictionWriter
from lightning_qlora.callbacks.progress import QuietLightningInternals
from lightning_qlora.cli.inference import Inference, InferenceCLI
from lightning_qlora.data.inference_prompts import read_prompt_rows
from lightning_qlora.data.rows import DataError
from lightning_qlora.models.generation import PromptCollator


def _arguments(parser: LightningArgumentParser) -> None:
    parser.add_argument("--prompts", type=str, required=True, help="JSONL/JSON of instruction or chat rows")
    parser.add_argument("--output", type=str, required=True, help="predictions JSONL (replaced atomically)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (left-padded)")
    parser.add_argument("--format", type=str, default="auto", help="auto, alpaca or chat")


def prompt_items(inference: Inference, path: str, format: str = "auto") -> list[dict[str, Any]]:
    """Read and render the prompt rows of ``path``: one ``{"prompt": text, "index", "where", ...}`` per row.

    Raises:
        DataError: for a missing file or a malformed row (naming its line).
    """
    rows = read_prompt_rows(path, format, inference.system_prompt)
    items = []
    for index, row in enumerate(rows):
        item: dict[str, Any] = {"prompt": inference.render(row.messages, row.where), "index": index, "where": row.where}
        if row.id is not None:
            item["id"] = row.id
        item["messages"] = [{"role": m["role"], "content": m["content"]} for m in row.messages]
        if row.reference is not None:
            item["reference"] = row.reference
        items.append(item)
    return items


def check_prompt_lengths(inference: Inference, items: list[dict[str, Any]]) -> None:
    """Refuse, before the model loads, a rendered prompt that leaves no room for an answer in the context window.

    Raises:
        DataError: naming the first such row (file and line), its length and the window.
    """
    window = inference.context_window()
    if window is None:
        return
    for item in items:
        tokens = len(inference.tokenizer(item["prompt"], add_special_tokens=inference.add_special_tokens)["input_ids"])
        if tokens >= window:
            raise DataError(
                f"{item['where']}: the prompt is {tokens} tokens but the model's context window is {window} tokens; "
                "shorten the row or remove it"
            )


def generate_command(args: list[str], parser_class: type[LightningArgumentParser] = LightningArgumentParser) -> None:
    """Run ``lightning-qlora generate`` with ``args`` (the command line after ``generate``).

    Args:
        args: the options.
        parser_class: the CLI's parser class (``lightning_qlora.cli.main.OneLineErrorParser``).

    Raises:
        ValueError: for bad options or rows (the CLI prints one line).
        FileNotFoundError: for a missing prompts file, model or adapter.
    """
    cli = InferenceCLI(
        args,
        parser_class,
        "lightning-qlora generate",
        "Complete a JSONL of prompts with the fine-tuned model (4-bit base + adapter); write predictions JSONL.",
        _arguments,
        progress_bar=sys.stderr.isatty(),
    )
    config = cli.config_init
    batch_size = config["batch_size"]
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"--batch_size {batch_size!r}: pass a whole number >= 1")
    if Path(config["output"]).expanduser().resolve() == Path(config["prompts"]).expanduser().resolve():
        raise ValueError(f"--output {config['output']} is the --prompts file; write the predictions to another file")
    writer = JSONLPredictionWriter(config["output"])
    inference = cli.inference()
    items = prompt_items(inference, config["prompts"], config["format"])  # bad rows fail before the model loads
    check_prompt_lengths(inference, items)
    inference.load()
    print(f"lightning-qlora generate: {inference.loaded}; {len(items)} prompts", file=sys.stderr, flush=True)
    loader = DataLoader(
        items,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=PromptCollator(inference.tokenizer, inference.add_special_tokens),
    )
    trainer = inference.trainer
    trainer.callbacks.append(writer)
    quiet = QuietLightningInternals()  # Lightning's own deprecation warnings, which no user can act on
    quiet.enter()
    try:
        trainer.predict(inference.module, dataloaders=loader, return_predictions=False)
    finally:
        quiet.exit()
    print(f"lightning-qlora generate: wrote {writer.rows_written} predictions to {writer.path}", file=sys.stderr)


__all__ = ["check_prompt_lengths", "generate_command", "prompt_items"]
