"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny Llama models built offline (no hub)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no pool of compile workers (fresh interpreters)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:  # `pytest -n N`: one torch thread per core and worker (2 workers x 2 threads on 2 cores thrash)
    _THREADS = max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))  # the subprocesses tests start, too

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France? Answer: Paris.",
    "Instruction: add two numbers. Input: 2 and 3. Response: 5.",
    "Low-rank adapters train a few parameters while the backbone stays frozen in four bits.",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z 0 1 2 3 4 5 6 7 8 9",
    "the cat sat on the mat; the dog sat on the log; birds fly south in winter.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(path: Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on a tiny corpus and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_llama_config(vocab_size: int = 512, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=3,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    # random init is small; widen weights a bit so 4-bit rounding and LoRA effects are visible in tests
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def write_adapter_recipe(root: Path, model_dir: Path, adapter: Path, seed: int) -> Path:
    """A random PEFT adapter (r=8, ``B ~ N(0, 0.5²)``) for the tiny Llama at ``adapter`` and ``root/recipe.yaml``
    running that model in NF4 with fp32 compute: what the inference commands (chat, serve) load; returns the recipe."""
    import yaml

    from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_modules
    from lightning_qlora.lora.peft_format import export_peft

    model = build_tiny_llama()
    config = LoRAConfig(r=8, alpha=16, dropout=0.0)
    inject_lora(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.normal_(0, 0.5)
    export_peft(model, adapter, config)
    recipe = root / "recipe.yaml"
    nf4 = {"class_path": "lightning_qlora.NF4Precision", "init_args": {"compute_dtype": "fp32"}}
    model_args = {"model": str(model_dir), "dtype": "fp32"}
    recipe.write_text(yaml.safe_dump({
        "trainer": {"plugins": [nf4]}, "model": {"class_path": "lightning_qlora.CausalLM", "init_args": model_args}
    }))  # fmt: skip
    return recipe


def quiet_trainer(tmp_path, callbacks, max_steps: int) -> Any:
    """Training only (no validation, logger, bar or summary): NF4 base, paged AdamW (unpaged on CPU)."""
    import lightning.pytorch as pl

    from lightning_qlora import NF4Precision, PagedOptimizerStrategy

    return pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[NF4Precision()],
        strategy=PagedOptimizerStrategy(),
        callbacks=callbacks,
    )


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread inside the block: decoding is many tiny ops, faster on one thread than on two contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """:func:`one_torch_thread` for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with one_torch_thread():
        yield


def load_with_hf_bitsandbytes(path):
    """The anchor's loading path: transformers + ``BitsAndBytesConfig`` NF4 + double quant, bf16, on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map={"": "cpu"}, quantization_config=quant
    )


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A saved tiny Llama (safetensors) with its tokenizer, like a local hub snapshot."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    model = build_tiny_llama()
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture()
def tiny_llama():
    return build_tiny_llama()


class TinyMLP(torch.nn.Module):
    """A plain MLP with a head named `output`; hidden sizes are multiples of 64."""

    def __init__(self, d_in: int = 64, d_hidden: int = 128, d_out: int = 64):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(d_hidden, d_hidden)
        self.output = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.output(self.act(self.fc2(self.act(self.fc1(x)))))


@pytest.fixture()
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP()


class NoLinear(torch.nn.Module):
    """A model with no linear layer at all (bad input for the plugin and the callback)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 64)
        self.norm = torch.nn.LayerNorm(64)


@pytest.fixture(scope="module")
def base():
    """A tiny Llama in eval mode, shared by a test module."""
    return build_tiny_llama().eval()


@pytest.fixture(scope="module")
def ids():
    """A fixed batch of token ids for the tiny models."""
    return torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", autouse=True)
def _isolated_datasets_cache(tmp_path_factory):
    try:
        import datasets
    except ImportError:  # a machine without it (a GPU box running tests/test_cuda.py): nothing to isolate
        yield
        return

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(autouse=True)
def _skip_env_report(monkeypatch):
    """lm-eval's `add_env_info` shells out to `pip list` on every run (~1-2 s); not what these tests check."""
    try:
        import lm_eval.evaluator
    except ImportError:  # a machine without lm-eval (a GPU box running tests/test_cuda.py)
        return

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


class Forked:
    """A real child process running ``target()`` in a fork of this one (a ``subprocess.Popen`` look-alike).

    Tests that need many processes (kill -9 and resume) fork instead of starting fresh interpreters: the child has
    torch, Lightning and transformers imported already (a fresh ``import lightning`` costs about 10 s of CPU on the
    2-core CI machine). Its stdout and stderr go to files; it runs torch single-threaded, as the workers did under
    ``OMP_NUM_THREADS=1`` (a thread pool forked mid-use is not safe to reuse).
    """

    def __init__(self, target, out_dir: Path, name: str, cwd: Path | None = None) -> None:
        import sys

        out_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = out_dir / f"{name}.out", out_dir / f"{name}.err"
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid:
            return
        code = 0
        try:  # the child: never returns into pytest
            for fd, path in ((1, self.stdout_path), (2, self.stderr_path)):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # the interpreter's own, on fds 1 and 2
            _log_handlers_to(sys.stderr)
            torch.set_num_threads(1)
            if cwd is not None:
                os.chdir(cwd)
            target()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int) and exit_.code is not None:
                print(exit_.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float = 300) -> int:
        import time

        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"forked child {self.pid} still running after {timeout} s")
            time.sleep(0.05)
        return self.returncode

    def kill(self) -> None:
        import signal

        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait(30)

    def output(self, timeout: float = 300):
        """Wait, then ``CompletedProcess(args, returncode, stdout, stderr)``."""
        import subprocess

        code = self.wait(timeout)
        return subprocess.CompletedProcess([self.pid], code, self.stdout_path.read_text(), self.stderr_path.read_text())


def hold_run_lock(folder: Path, out_dir: Path, beside: bool = False) -> Forked:
    """A live process (a fork) holding ``folder``'s run lock until killed; returns once the lock is held."""
    import json
    import time

    from lightning_qlora.callbacks.run_lock import RunDirLock

    lock_path = RunDirLock(folder, beside=beside).path

    def hold() -> None:
        RunDirLock(folder, beside=beside).acquire()
        time.sleep(300)

    child = Forked(hold, out_dir, f"lock-holder-{os.getpid()}-{time.monotonic_ns()}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if json.loads(lock_path.read_text())["pid"] == child.pid:
                return child
        except (OSError, ValueError, KeyError):
            pass
        if child.poll() is not None:
            raise AssertionError(f"the lock holder exited ({child.returncode}): {child.stderr_path.read_text()}")
        time.sleep(0.02)
    child.kill()
    raise AssertionError(f"the lock holder did not take {folder} within 60 s")


def _log_handlers_to(stream) -> None:
    """Point every logging stream handler (Lightning's, pytest's capture) at ``stream``, as in a fresh process."""
    import logging

    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for logger in loggers:
        for handler in list(logger.handlers):
            if type(handler).__module__.startswith("_pytest"):  # pytest's capture: nothing reads it in a child
                logger.removeHandler(handler)
            elif isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                try:
                    handler.setStream(stream)
                except ValueError:  # setStream flushed the old stream: a capture buffer closed since (litserve's)
                    handler.stream = stream


HEAVY_FIRST = (
    "test_compilation_dropout.py", "test_compilation.py", "test_architectures.py", "test_distributed.py",
    "test_bad_inputs.py", "test_gguf_conversion.py", "test_bench.py", "test_precision.py", "test_resume.py",
)  # fmt: skip
"""The longest modules (tens of seconds each on 2 cores), run first: with ``-n 2 --dist loadscope`` the short ones
then fill both workers to the end instead of one long module running alone last."""


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.path)).name, len(rank)))  # stable: other orders kept
