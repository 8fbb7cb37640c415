"""`lightning-qlora chat` through a pipe and a pseudo-terminal: streamed answers, the conversation kept through the
chat template, `/reset`, `/exit` and end of input.

The chat runs in a fork of this process (torch, Lightning and transformers already imported; a fresh interpreter
costs about 10 s of CPU here) with its stdin a pipe, or a pseudo-terminal driven by pexpect.
"""

import io
import os
import pty
import sys
import time

import pytest
import torch
from conftest import Forked, one_torch_thread, write_adapter_recipe
from lightning.pytorch.cli import LightningArgumentParser

from lightning_qlora.cli.inference import InferenceCLI
from lightning_qlora.cli.main import main
from lightning_qlora.models.generation import encode_prompts, generate

QUESTIONS = ["What is the capital of France?", "the quick brown fox"]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """A recipe and a random PEFT adapter for the tiny Llama; the answers the chat must give, computed here."""
    root = tmp_path_factory.mktemp("chat")
    recipe = write_adapter_recipe(root, tiny_llama_dir, root / "adapter", seed=2)
    args = ["--config", str(recipe), "--adapter", str(root / "adapter"), "--max_new_tokens", "6"]
    with one_torch_thread():
        inference = InferenceCLI(args, LightningArgumentParser, "chat", "test").inference().load()
        first = answer(inference, [QUESTIONS[0]], [])
        second = answer(inference, [QUESTIONS[0], QUESTIONS[1]], [first])
    assert second != answer(inference, [QUESTIONS[1]], [])  # the first turn changes the second answer
    return {"root": root, "args": args, "first": first, "second": second}


def answer(inference, questions, answers):
    """Greedy answer to the last question after the earlier turns, rendered with the chat template."""
    messages = []
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    batch = encode_prompts(inference.tokenizer, [inference.render(messages)], inference.add_special_tokens)
    with torch.no_grad():
        return generate(inference.model, inference.tokenizer, batch["input_ids"], batch["attention_mask"],
                        inference.options)[0].text  # fmt: skip


def chat_in_fork(args):
    """The body of a forked chat process: stdin, stdout and stderr are file descriptors 0, 1 and 2."""
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.argv = ["lightning-qlora"]
    main(["chat", *args])


def test_piped_input_gets_only_the_answers_and_ends_at_eof(setup, tmp_path):
    read, write = os.pipe()

    def target():
        os.dup2(read, 0)
        os.close(write)
        chat_in_fork(setup["args"])

    child = Forked(target, tmp_path, "chat-pipe")
    os.close(read)
    script = f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n/reset\n{QUESTIONS[0]}\n"  # an empty line is skipped
    os.write(write, script.encode())
    os.close(write)  # end of input: the chat ends by itself
    result = child.output(timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{setup['first']}\n{setup['second']}\n{setup['first']}\n"
    assert "Traceback" not in result.stderr and ">>" not in result.stdout


def test_terminal_session_streams_resets_and_exits(setup):
    import pexpect.fdpexpect

    pid, fd = pty.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
            chat_in_fork(setup["args"])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    terminal = pexpect.fdpexpect.fdspawn(fd, timeout=60, encoding="utf-8")
    try:
        terminal.expect_exact("/reset")  # the banner names the commands
        answers = []
        for line in [QUESTIONS[0], QUESTIONS[1], "/reset", QUESTIONS[0]]:
            terminal.expect_exact(">> ")
            terminal.sendline(line)
            if not line.startswith("/"):
                terminal.expect_exact(">> ")
                echoed, _, said = terminal.before.replace("\r\n", "\n").partition("\n")
                answers.append(said.removesuffix("\n"))
                terminal.sendline("")  # an empty line: a new prompt, nothing asked
        assert answers == [setup["first"], setup["second"], setup["first"]]
        terminal.expect_exact(">> ")
        terminal.sendline("/exit")
        terminal.expect(pexpect.EOF)
    finally:
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            done = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(done[1]) == 0
