"""``lightning-qlora serve``: an OpenAI-compatible HTTP server over the fine-tuned model, built on LitServe.

.. code-block:: bash

    lightning-qlora serve --config recipes/demo/smollm2-135m-faq.yaml --port 8000   # http://127.0.0.1:8000/v1

``/v1/chat/completions`` (the chat template the model was trained with), ``/v1/completions`` (plain prompts) and
``/v1/models``, as JSON or server-sent events (``"stream": true``). It listens on 127.0.0.1 unless ``--host 0.0.0.0``
is given. Requests are checked and rendered by the API server process (bad ones get a 400 JSON error and never reach
the model) and queued for the model's worker process, which answers them one at a time (``--workers N``: N copies
of the model on the device, answering N requests at once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException
from lightning.pytorch.cli import LightningArgumentParser

from lightning_qlora.cli.inference import Inference, InferenceCLI, quiet_lightning
from lightning_qlora.cli.openai_spec import OpenAIServeSpec, PreparedCompletion, PromptRenderer, add_error_handlers
from lightning_qlora.models.generation import GenerationOptions, encode_prompts
from lightning_qlora.models.streaming import TextStream
from lightning_qlora.utils.errors import first_line

DESCRIPTION = "Serve the fine-tuned model over an OpenAI-compatible HTTP API (LitServe)."


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
"""uvicorn's log levels (``--log_level``)."""


def _arguments(parser: LightningArgumentParser) -> None:
    parser.add_argument("--host", type=str, default="127.0.0.1", help="127.0.0.1 (this machine only) or 0.0.0.0")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (1-65535; below 1024 needs root)")
    parser.add_argument(
        "--model_name", type=str | None, default=None, help="the id /v1/models lists (default: the run)"
    )
    parser.add_argument("--workers", type=int, default=1, help="model copies answering requests at once")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait in the queue")
    parser.add_argument(
        "--log_level", type=str, default="info", help=f"uvicorn/LitServe log level: {', '.join(LOG_LEVELS)}"
    )


def check_serve_arguments(config: Any, port_free: bool = False) -> None:
    """Refuse bad ``serve`` options in one line each, before the recipe's model, tokenizer or Trainer is built.

    Args:
        config: the parsed command line (``host``, ``port``, ``workers``, ``timeout``, ``log_level``).
        port_free: also check that ``host:port`` can be listened on now (a socket is bound and closed).

    Raises:
        ValueError: naming the value received and what to pass instead.
    """
    port, workers, timeout = config["port"], config["workers"], config["timeout"]
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"--port {port!r}: pass a TCP port from 1 to 65535 (e.g. 8000; below 1024 needs root)")
    if type(workers) is not int or workers < 1:
        raise ValueError(f"--workers {workers!r}: pass a whole number >= 1 (model copies answering at once)")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"--timeout {timeout!r}: pass the seconds a request may wait in the queue, > 0 (e.g. 600)")
    if str(config["log_level"]).lower() not in LOG_LEVELS:
        raise ValueError(f"--log_level {config['log_level']!r}: pass one of {', '.join(LOG_LEVELS)}")
    host = config["host"]
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"--host {host!r}: pass 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    if port_free:
        _check_can_listen(host, port)


def _check_can_listen(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will (``SO_REUSEADDR``) and let go, so a port in use is said before any load."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as err:
        reason = err.strerror or first_line(err)
        raise ValueError(
            f"--host {host} --port {port}: cannot listen there ({reason}); pass another --port, or stop what uses it"
        ) from None


class QLoRAServeAPI(ls.LitAPI):
    """LitServe's worker side: builds the model in ``setup`` and streams each queued request's answer.

    Args:
        args: the ``serve`` command line; the worker reads the recipe again (it runs in a process of its own).
        parser_class: the CLI's parser class.
        spec: the OpenAI spec (it checked and rendered the requests).
    """

    def __init__(self, args: list[str], parser_class: type[LightningArgumentParser], spec: OpenAIServeSpec) -> None:
        super().__init__(spec=spec, max_batch_size=1)
        self.args = list(args)
        self.parser_class = parser_class
        self.inference: Inference | None = None

    def setup(self, device: Any) -> None:
        """Build the 4-bit model and load its adapter on ``device`` (:func:`~.inference.load_for_inference`)."""
        with quiet_lightning():
            cli = InferenceCLI(
                self.args, self.parser_class, "lightning-qlora serve", DESCRIPTION, _arguments, device=device
            )
            self.inference = cli.inference().load()
        print(f"lightning-qlora serve: worker ready on {device}: {self.inference.loaded}", file=sys.stderr, flush=True)

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        """The request as the API server prepared it (rendered prompt, decoding options)."""
        return request

    def predict(self, request: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Stream the answer: chat deltas (``role``/``content``) or completion text, usage and finish reason last."""
        inference = self.inference
        assert inference is not None, "setup() builds the model first"
        chat = not isinstance(request, PreparedCompletion)
        try:
            options = GenerationOptions(**request.options)
            add_special = inference.add_special_tokens if chat else True  # plain prompts: the tokenizer's own BOS
            batch = encode_prompts(inference.tokenizer, [request.prompt_text], add_special)
            stream = TextStream(
                inference.model,
                inference.tokenizer,
                batch["input_ids"],
                batch["attention_mask"],
                options,
                inference.forward_context,
            )
            for piece in stream:
                yield {"role": "assistant", "content": piece} if chat else {"text": piece}
        except ValueError as err:  # checked by the API server already; a 400 all the same
            raise HTTPException(status_code=400, detail=first_line(err)) from None
        done = stream.completion
        assert done is not None
        usage = {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "finish_reason": done.finish_reason,
        }
        yield {"role": "assistant", "content": "", **usage} if chat else {"text": "", **usage}

    def encode_response(self, output: Iterator[dict[str, Any]], **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The predicted dicts as they are (the spec formats them)."""
        yield from output


def served_name(inference: Inference) -> str:
    """The model id: the run folder of the adapter (``runs/<run>/adapter`` → ``<run>``), else the base model's name."""
    if inference.adapter is not None:
        path = Path(inference.adapter).expanduser().resolve()
        path = path.parent if path.is_file() else path
        return path.parent.name if path.name in ("adapter", "checkpoints") and path.parent.name else path.name
    return Path(str(getattr(inference.module, "source", "model"))).stem or "model"


def serve_api(
    args: list[str], parser_class: type[LightningArgumentParser], check_port: bool = False
) -> tuple[QLoRAServeAPI, InferenceCLI]:
    """The LitAPI to serve (its spec checks and renders requests) and the parsed command line.

    The options are checked first (:func:`check_serve_arguments`, before anything is built), then the recipe is read
    and the tokenizer loaded here, so bad options fail before anything starts; the model is built later, in
    LitServe's worker process (:meth:`QLoRAServeAPI.setup`).

    Args:
        args: the command line after ``serve``.
        parser_class: the CLI's parser class.
        check_port: also refuse a ``--host``/``--port`` that cannot be listened on now (``serve_command`` does).

    Raises:
        ValueError: for bad options.
        FileNotFoundError: for a missing adapter.
    """

    def check(config: Any) -> None:
        check_serve_arguments(config, port_free=check_port)

    cli = InferenceCLI(args, parser_class, "lightning-qlora serve", DESCRIPTION, _arguments, check_arguments=check)
    config = cli.config_init
    inference = cli.inference()
    window = inference.context_window()
    renderer = PromptRenderer(inference.tokenizer, inference.style, inference.system_prompt, window, inference.options)
    spec = OpenAIServeSpec(renderer, config["model_name"] or served_name(inference))
    return QLoRAServeAPI(args, parser_class, spec), cli


def serve_command(args: list[str], parser_class: type[LightningArgumentParser] = LightningArgumentParser) -> None:
    """Run ``lightning-qlora serve`` with ``args`` (the command line after ``serve``) until interrupted.

    Args:
        args: the options.
        parser_class: the CLI's parser class (``lightning_qlora.cli.main.OneLineErrorParser``).

    Raises:
        ValueError: for bad options, host or port (the CLI prints one line).
    """
    api, cli = serve_api(args, parser_class, check_port=True)
    config = cli.config_init
    server = ls.LitServer(
        api,
        accelerator=cli.trainer.strategy.root_device.type,
        devices=1,
        workers_per_device=config["workers"],
        timeout=config["timeout"],
    )
    add_error_handlers(server.app)
    host, port = config["host"], config["port"]
    print(f"lightning-qlora serve: {api.spec.model_name} at http://{host}:{port}/v1 (Ctrl+C stops)", file=sys.stderr)
    level = str(config["log_level"]).lower()
    with _terminate_as_interrupt():
        server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level=level)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill PID``, process managers) takes Ctrl+C's path: LitServe then stops its API server and workers.

    Without it the main process dies alone and its children keep serving on the port. Processes forked from this one
    keep the default: they die on SIGTERM, which is how LitServe stops them.
    """
    main_pid = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["LOG_LEVELS", "QLoRAServeAPI", "check_serve_arguments", "serve_api", "serve_command", "served_name"]
