"""`lightning-qlora serve` answered by the `openai` client on 127.0.0.1: a completion, a streamed chat, 8 concurrent
requests, malformed requests each a 4xx JSON error, and the server still serving after them.

One server for the module: a fork of this process runs `main(["serve", ...])` in a process group of its own (so every
process LitServe starts is stopped at the end); answers are checked against greedy decoding of the same 4-bit model
and adapter here.
"""

import contextlib
import io
import json
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import one_torch_thread, write_adapter_recipe
from lightning.pytorch.cli import LightningArgumentParser

from lightning_qlora.cli.inference import InferenceCLI
from lightning_qlora.cli.main import main
from lightning_qlora.models.generation import GenerationOptions, encode_prompts, generate

QUESTION = "What is the capital of France?"
PROMPT = "The quick brown fox"


def http(method, url, body=None, timeout=60):
    """``(status, body bytes)`` of one request; ``body``: JSON-able, or raw bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    recipe = write_adapter_recipe(root, tiny_llama_dir, root / "run" / "adapter", seed=3)
    port = free_port()
    args = ["--config", str(recipe), "--adapter", str(root / "run" / "adapter"), "--max_new_tokens", "8"]

    pid = serve_in_fork(args + ["--port", str(port), "--log_level", "warning"], root)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if http("GET", f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{(root / 'server.err').read_text()[-3000:]}")
            time.sleep(0.25)
        yield {"base": base, "args": args, "name": "run", "pid": pid}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # the server's process group: its API server and model worker too
        os.waitpid(pid, 0)


def serve_in_fork(args, out_dir):
    """``lightning-qlora serve`` in a fork of this process, leading a process group of its own.

    LitServe spawns its model worker (a fresh interpreter: about 10 s of imports on the 2-core CI machine); here it is
    forked instead, as this process already imported everything (``test_the_api_pickles`` checks what spawning
    pickles).
    """
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never returns into pytest
        os.setpgid(0, 0)
        for fd, name in ((1, "server.out"), (2, "server.err")):
            handle = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        torch.set_num_threads(1)  # decoding is many tiny ops
        spawn = multiprocessing.get_context
        multiprocessing.get_context = lambda method=None: spawn("fork" if method == "spawn" else method)
        sys.argv = ["lightning-qlora"]
        main(["serve", *args])
    finally:
        os._exit(0)


def test_sigterm_stops_the_server_and_its_workers(server, tmp_path):
    """``kill PID`` (SIGTERM) takes Ctrl+C's path: the API server and the model worker stop with the main process."""
    port = free_port()
    pid = serve_in_fork([*server["args"], "--port", str(port), "--log_level", "warning"], tmp_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError):
                if http("GET", f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                    break
            if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{(tmp_path / 'server.err').read_text()[-3000:]}")
            time.sleep(0.25)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not os.waitpid(pid, os.WNOHANG)[0]:
            assert time.monotonic() < deadline, "the main process outlived SIGTERM by 60 s"
            time.sleep(0.2)
        while True:  # no process of its group is left (the API server and the worker were its children)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "a server process outlived the main one"
            time.sleep(0.2)
        with pytest.raises(OSError):
            http("GET", f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@pytest.fixture(scope="module")
def expected(server):
    """Greedy answers of the same 4-bit model and adapter, in this process."""
    with one_torch_thread():
        inference = InferenceCLI(server["args"], LightningArgumentParser, "serve", "test").inference().load()
        tok = inference.tokenizer
        chat = encode_prompts(tok, [inference.render([{"role": "user", "content": QUESTION}])], False)
        plain = encode_prompts(tok, [PROMPT], True)
        with torch.no_grad():
            answers = [generate(inference.model, tok, b["input_ids"], b["attention_mask"], GenerationOptions(n))[0]
                       for b, n in ((chat, 8), (plain, 5))]  # fmt: skip
    return {"chat": answers[0], "completion": answers[1]}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, max_tokens=None, **kwargs):
    extra = {"max_tokens": max_tokens} if max_tokens else {}
    return client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": QUESTION}], **extra, **kwargs
    )


def test_models_lists_the_run(client, server):
    assert [m.id for m in client.models.list().data] == [server["name"]]


def test_a_completion(client, expected):
    done = client.completions.create(model="run", prompt=PROMPT, max_tokens=5)
    choice = done.choices[0]
    assert choice.text == expected["completion"].text
    assert choice.finish_reason == expected["completion"].finish_reason
    assert done.usage.completion_tokens == expected["completion"].completion_tokens
    assert done.usage.prompt_tokens == expected["completion"].prompt_tokens


def test_a_streamed_chat(client, expected):
    chunks = list(chat(client, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected["chat"].text
    assert chunks[-1].choices[0].finish_reason == expected["chat"].finish_reason
    whole = chat(client)
    assert whole.choices[0].message.content == expected["chat"].text
    assert whole.usage.completion_tokens == expected["chat"].completion_tokens
    short = chat(client, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_n_seeded_choices_differ_repeat_and_stream_whole(client, expected):
    """n=3 sampled with a seed: choice i samples with seed + i; streamed, every choice runs to its own end."""
    ask = {"n": 3, "temperature": 1.5, "seed": 7, "max_tokens": 6}
    whole = chat(client, **ask)
    texts = [c.message.content for c in whole.choices]
    assert [c.index for c in whole.choices] == [0, 1, 2] and len(set(texts)) == 3, texts
    assert texts == [c.message.content for c in chat(client, **ask).choices]  # seeded: repeats
    assert whole.usage.prompt_tokens == expected["chat"].prompt_tokens  # the prompt counts once, not n times
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **ask))
    streamed, reasons = ["", "", ""], [None, None, None]
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        streamed[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
        reasons[chunk.choices[0].index] = chunk.choices[0].finish_reason or reasons[chunk.choices[0].index]
    assert streamed == texts and reasons == [c.finish_reason for c in whole.choices]
    assert len({c.id for c in chunks}) == 1  # one id for the whole response
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    completions = client.completions.create(model="run", prompt=PROMPT, max_tokens=5, n=2, temperature=1.0, seed=3)
    assert completions.usage.prompt_tokens == expected["completion"].prompt_tokens
    assert completions.choices[0].text != completions.choices[1].text


def test_eight_concurrent_requests_are_all_answered(client, expected):
    def ask(i):
        if i % 2:
            return client.completions.create(model="run", prompt=PROMPT, max_tokens=5).choices[0].text
        return chat(client).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [expected["completion"].text if i % 2 else expected["chat"].text for i in range(8)]


MALFORMED = [
    ("POST", "/v1/chat/completions", b"{not json"),
    ("POST", "/v1/chat/completions", {"model": "x"}),
    ("POST", "/v1/chat/completions", {"messages": "hello"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0, "stream": True},
    ),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}], "stream": True}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 100}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 10}}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}),
    ("POST", "/v1/completions", {"prompt": [1, 2, 3]}),
    ("POST", "/v1/completions", {"prompt": "fox " * 300}),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}),
    ("GET", "/v1/chat/completions", None),
]


def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(client, server, expected):
    for method, path, body in MALFORMED:
        status, text = http(method, server["base"] + path, body)
        assert 400 <= status < 500, (path, body, status, text)
        assert json.loads(text)["error"]["message"], text
    assert http("GET", f"{server['base']}/health")[0] == 200
    assert chat(client).choices[0].message.content == expected["chat"].text
    assert os.waitpid(server["pid"], os.WNOHANG)[0] == 0  # still running


def test_the_api_pickles_as_litserve_spawns_it(server):
    from lightning_qlora.cli.serve import serve_api

    api, _ = serve_api(server["args"], LightningArgumentParser)
    again = pickle.loads(pickle.dumps(api))
    assert again.args == server["args"] and again.spec.renderer.tokenizer("fox")["input_ids"]


def run_serve(args, capsys, monkeypatch):
    """``(exit code, stderr)`` of ``lightning-qlora serve`` that must stop before the recipe's classes are built."""

    def built(self):
        raise AssertionError("the model and Trainer were built before the options were checked")

    monkeypatch.setattr(InferenceCLI, "instantiate_classes", built)
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    capsys.readouterr()
    try:
        main(["serve", *args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def bare_recipe(tmp_path_factory):
    """A recipe whose model is never loaded: these checks come first."""
    path = tmp_path_factory.mktemp("serve_options") / "recipe.yaml"
    path.write_text('model:\n  class_path: lightning_qlora.CausalLM\n  init_args:\n    model: "never-loaded"\n')
    return path


BAD_OPTIONS = {
    "port too high": (["--port", "70000"], "--port 70000: pass a TCP port from 1 to 65535"),
    "port zero": (["--port", "0"], "--port 0: pass a TCP port from 1 to 65535"),
    "no workers": (["--workers", "0"], "--workers 0: pass a whole number >= 1"),
    "no timeout": (["--timeout", "0"], "--timeout 0.0: pass the seconds a request may wait in the queue, > 0"),
    "log level": (["--log_level", "loud"], "--log_level 'loud': pass one of critical, error, warning, info, debug"),
    "empty host": (["--host", " "], "--host ' ': pass 127.0.0.1 (this machine only) or 0.0.0.0"),
    "decoding": (["--max_new_tokens", "0"], "max_new_tokens=0: pass a whole number >= 1"),
    "prompt style": (["--prompt_style", "plain"], "--prompt_style 'plain': use chat_template or alpaca"),
    "missing adapter": (["--adapter", "/nowhere/adapter"], "adapter /nowhere/adapter does not exist; pass a PEFT"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_one_line_before_anything_is_built(case, bare_recipe, capsys, monkeypatch):
    options, expected = BAD_OPTIONS[case]
    code, err = run_serve(["--config", str(bare_recipe), *options], capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err  # nothing else printed: no Trainer, no tips, no loading
    assert lines[0].startswith("lightning-qlora: error: ") and expected in lines[0], err


def test_a_port_in_use_is_one_line_before_anything_is_built(bare_recipe, capsys, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run_serve(["--config", str(bare_recipe), "--port", str(port)], capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (" in lines[0] and "pass another --port" in lines[0]
