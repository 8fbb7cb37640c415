"""``lightning-qlora chat``: talk to the fine-tuned model in the terminal, its answers streamed as they are generated.

.. code-block:: bash

    lightning-qlora chat --config recipes/demo/smollm2-135m-faq.yaml        # the recipe's adapter (export_dir)
    echo "How long is a building permit valid?" | lightning-qlora chat --config ...   # piped: answers only

The conversation is kept and rendered through the chat template (or the Alpaca prompt) the model was trained with;
``/reset`` starts a new one, ``/exit`` (or end of input, Ctrl+D) quits, Ctrl+C stops the answer being generated. On a
terminal there is a ``>>`` prompt with line editing; with piped input only the answers are written, each ended by a
newline (an answer may span lines: ``generate`` writes one JSON record per prompt).
"""

from __future__ import annotations

import contextlib
import sys
from typing import IO

from lightning.pytorch.cli import LightningArgumentParser

from lightning_qlora.cli.inference import Inference, InferenceCLI, quiet_lightning
from lightning_qlora.data.prompts import DataError
from lightning_qlora.models.streaming import TextStream
from lightning_qlora.utils.errors import first_line

PROMPT = ">> "
COMMANDS = {"/reset": "start a new conversation", "/exit": "quit (also /quit, Ctrl+D)"}


def chat_command(args: list[str], parser_class: type[LightningArgumentParser] = LightningArgumentParser) -> None:
    """Run ``lightning-qlora chat`` with ``args`` (the command line after ``chat``).

    Args:
        args: the options.
        parser_class: the CLI's parser class (``lightning_qlora.cli.main.OneLineErrorParser``).

    Raises:
        ValueError: for bad options or an adapter that does not fit (the CLI prints one line).
    """
    interactive = sys.stdin.isatty()
    with quiet_lightning():
        cli = InferenceCLI(
            args, parser_class, "lightning-qlora chat", "Chat with the fine-tuned model in the terminal."
        )
        inference = cli.inference().load()
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            commands = ", ".join(f"{name} {what}" for name, what in COMMANDS.items())
            print(f"lightning-qlora chat: {inference.loaded}. {commands}; Ctrl+C stops an answer.", file=sys.stderr)
        Chat(inference, sys.stdout, interactive).run(sys.stdin)


class Chat:
    """The conversation loop: read a line, stream the answer, remember both.

    Args:
        inference: the loaded model and its prompt settings.
        out: where answers go.
        interactive: show the ``>>`` prompt and status lines (a terminal), or write answers only (a pipe).
    """

    def __init__(self, inference: Inference, out: IO[str], interactive: bool) -> None:
        self.inference = inference
        self.out = out
        self.interactive = interactive
        self.messages: list[dict[str, str]] = []

    def run(self, stdin: IO[str]) -> None:
        """Answer lines until ``/exit`` or the end of the input."""
        while True:
            line = self._read(stdin)
            if line is None or line.strip() in ("/exit", "/quit"):
                return
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                self.messages = []
                self._status("(new conversation)")
                continue
            if text.startswith("/") and " " not in text:
                self._status(f"unknown command {text}; use " + ", ".join(COMMANDS))
                continue
            self.answer(text)

    def answer(self, text: str) -> str:
        """Stream the answer to ``text`` given the conversation so far, and add both to it."""
        messages = [*self.messages, {"role": "user", "content": text}]
        try:
            prompt = self.inference.render(self.inference.with_system_prompt(messages))
            batch = self.inference.encode([prompt])
            stream = TextStream(
                self.inference.model,
                self.inference.tokenizer,
                batch["input_ids"],
                batch["attention_mask"],
                self.inference.options,
                self.inference.forward_context,
            )
            pieces: list[str] = []
            try:
                for piece in stream:
                    pieces.append(piece)
                    self.out.write(piece)
                    self.out.flush()
            except KeyboardInterrupt:
                stream.cancel()
                for _ in stream:  # let the generating thread end
                    pass
                self._status("(stopped)")
        except (ValueError, DataError) as err:  # a conversation longer than the context, a template error
            self._status(f"lightning-qlora chat: {first_line(err)}; /reset starts a new conversation")
            return ""
        answer = "".join(pieces)
        self.out.write("\n")
        self.out.flush()
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer

    def _read(self, stdin: IO[str]) -> str | None:
        if self.interactive:
            try:
                return input(PROMPT)
            except EOFError:
                self.out.write("\n")
                return None
            except KeyboardInterrupt:
                self.out.write("\n")
                return ""
        line = stdin.readline()
        return line if line else None

    def _status(self, message: str) -> None:
        print(message, file=sys.stderr if not self.interactive else self.out, flush=True)


__all__ = ["Chat", "chat_command"]
