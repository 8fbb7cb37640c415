"""Try every causal-LM type of transformers with a 4-bit base and LoRA: tiny config, load, one forward + backward.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``:

1. **config**: ``AutoConfig.for_model(type, **TINY)`` (hidden 64, 2 layers, vocab 512, a few experts, ...); a
   composite config (a ``text_config``) is replaced by its tiny text config when that is a causal-LM type itself,
   else rebuilt around it. Token ids outside the tiny vocabulary are moved into it.
2. **build**: ``AutoModelForCausalLM.from_config`` in fp32 and one forward + backward in plain transformers (no
   4 bits, no LoRA), then ``save_pretrained`` to a temporary folder. When config or build fails, it is retried
   without the keys the error names (the least essential first), else without one key whose removal changes the
   error; what still fails is transformers' own (with these sizes), not this library's. A model over
   ``MAX_PARAMS`` parameters did not take the tiny sizes: skipped.
3. **load**: ``lightning_qlora.models.sources.load_causal_lm`` with NF4 + double quant (fp32 compute).
4. **lora**: ``inject_lora`` + ``inject_expert_lora`` (r=4) + ``mark_only_lora_trainable``.
5. **forward** on random ids with labels, then **backward**: the loss must be finite and the adapters get gradients.

A type that fails at load, lora, forward or backward is run again in plain transformers (no 4 bits, no LoRA), so the
table says whether the model fails on its own. Types run in ``--workers`` processes (each takes its list in turn,
one ``signal.alarm`` of ``--timeout`` seconds per type; a process stuck in native code is killed and restarted on
the rest), and results are written as they arrive, so a partial run is usable.

Usage::

    python docs/models_sweep.py --out /tmp/sweep.json --markdown docs/models.md [TYPE ...]
    python docs/models_sweep.py --render /tmp/sweep.json --markdown docs/models.md   # rewrite the section only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    # mixture of experts: few experts, every layer sparse when the config says which ones are
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, n_group=1, topk_group=1, first_k_dense_replace=1, decoder_sparse_step=1,
    mlp_only_layers=[],
    encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,  # BART-like
    encoder_attention_heads=4, decoder_attention_heads=4, rotary_dim=16,  # Whisper, PLBart; GPT-J, CodeGen
    num_heads=8, is_decoder=True,  # Mamba-2 SSM heads (8 x head_dim 16 = 2 x hidden 64); BERT-like decoders
)  # fmt: skip
"""Keys of the tiny config: sizes first, then what shrinks mixture-of-experts and Mamba-2 configs; ``is_decoder``
for encoder classes used as causal LMs (BERT-like, Reformer)."""
MAX_PARAMS = 40_000_000
MAX_TRIES = 30
"""Builds tried per type while looking for a key to drop whose error names none."""
KEEP = ("vocab_size", "hidden_size", "num_hidden_layers", "is_decoder")
"""Keys dropped only when an error names them (dropping them blindly makes a model large or not a decoder)."""


def _blind_order(key: str) -> int:
    """Which keys to try dropping first: the head sizes (most often inconsistent), then the extras, last first."""
    first = ["head_dim", "num_key_value_heads"]
    return first.index(key) if key in first else len(TINY) - list(TINY).index(key) + len(first)


"""A model over this many parameters did not take the tiny sizes (e.g. a vision tower at full size): skipped."""
STAGES = ("config", "build", "load", "lora", "forward", "backward")
START, END = "<!-- generated: sweep -->", "<!-- end generated -->"


class TypeTimeout(BaseException):
    """Raised by the alarm; a BaseException so that model code catching ``Exception`` does not swallow it."""


class Failure(Exception):
    """A check of this sweep that did not hold (no exception from the library, but a wrong result)."""


def _on_alarm(signum, frame):
    raise TypeTimeout("timed out")


def one_line(err: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` (and the next when the first ends with a colon), cut to ``limit``."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    line = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(err).__name__}: {line}"[:limit]


def where(err: BaseException) -> dict:
    """The innermost frame of the traceback, and the innermost one inside lightning_qlora (if any)."""
    frames = traceback.extract_tb(err.__traceback__)
    paths = [
        re.sub(r".*/(?=lightning_qlora/)", "", re.sub(r".*/(site|dist)-packages/", "", f.filename)) for f in frames
    ]
    short = [f"{path}:{f.lineno} {f.name}" for path, f in zip(paths, frames)]
    ours = [s for s in short if s.startswith("lightning_qlora/")]
    return {"frame": short[-1] if short else None, "lightning_qlora_frame": ours[-1] if ours else None}


# ----------------------------------------------------------------------------------------------------- config


class StageError(Exception):
    """An error of the config or build stage (``original`` is the library's exception)."""

    def __init__(self, stage: str, original: Exception) -> None:
        super().__init__(str(original))
        self.stage, self.original = stage, original


def _rejected(err: Exception, kwargs: dict) -> list[str]:
    """The keys an error names: in its message, or as the function that raised (a config property setter)."""
    frames = {f.name for f in traceback.extract_tb(err.__traceback__)}
    return [k for k in kwargs if re.search(rf"\b{re.escape(k)}\b", str(err)) or k in frames]


def _with_retries(make, kwargs: dict) -> tuple[object, list[str]]:
    """``make(**kwargs)``, dropping the keys it rejects: those an error names, else one whose removal gets further.

    Raises:
        StageError: the last error when no smaller set of keys works.
    """
    kwargs = dict(kwargs)
    dropped: list[str] = []
    tries = 0
    while True:
        try:
            return make(**kwargs), dropped
        except StageError as err:
            last = err
        named = _rejected(last.original, kwargs)
        if named:  # the least essential of them first (TINY lists the sizes first)
            kwargs.pop(named[-1])
            dropped.append(named[-1])
            continue
        progressed = False
        for key in sorted((k for k in kwargs if k not in KEEP), key=_blind_order):
            tries += 1
            if tries > MAX_TRIES:
                raise last
            try:
                return make(**{k: v for k, v in kwargs.items() if k != key}), [*dropped, key]
            except StageError as err:
                if (err.stage, one_line(err.original)) != (last.stage, one_line(last.original)):
                    kwargs.pop(key)
                    dropped.append(key)
                    progressed = True
                    break
        if not progressed:
            raise last


def _fix_token_ids(config) -> None:
    """Move special-token ids the tiny vocabulary does not hold into it (as a real tokenizer's would be)."""
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    for key in [k for k in vars(config) if k.endswith("token_id")]:
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= vocab:
            setattr(config, key, min(2, vocab - 1))
        elif isinstance(value, list) and any(v >= vocab for v in value):
            setattr(config, key, [min(2, vocab - 1)])


def _text_config(config):
    for args in ({"decoder": True}, {}):
        try:
            return config.get_text_config(**args)
        except Exception:  # ambiguous or unsupported: try the next form
            continue
    return config


def _tiny_config(model_type: str, kwargs: dict) -> tuple[object, dict]:
    """The config of ``model_type`` with ``kwargs``; a composite one replaced by or rebuilt around its text config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    notes: dict = {}
    config = AutoConfig.for_model(model_type, **kwargs)
    text = _text_config(config)
    if text is not config:
        tiny_text = type(text)(**kwargs)
        if tiny_text.model_type in CAUSAL:
            config = tiny_text
            if tiny_text.model_type != model_type:
                notes["tested_as"] = tiny_text.model_type
        else:
            attr = next((n for n in getattr(config, "sub_configs", {}) if getattr(config, n, None) is text), None)
            if attr is None:
                raise ValueError(f"{type(config).__name__}: cannot tell which sub-config is the text model")
            config = AutoConfig.for_model(model_type, **{attr: tiny_text.to_dict()})
            notes["tiny_sub_config"] = attr
    for sub in {id(c): c for c in (config, _text_config(config))}.values():
        _fix_token_ids(sub)
    return config, notes


def tiny_model(model_type: str) -> tuple[object, dict]:
    """A tiny fp32 model of ``model_type`` and notes (dropped keys, the text config used).

    Raises:
        StageError: ``config`` when no config could be built, ``build`` when transformers could not build the model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    def make(**kwargs):
        try:
            config, notes = _tiny_config(model_type, kwargs)
        except Exception as err:
            raise StageError("config", err) from err
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            if sum(p.numel() for p in model.parameters()) <= MAX_PARAMS:  # a large one is skipped, not run
                forward_backward(model.train(), getattr(_text_config(config), "vocab_size", None) or 512, {})
                model.zero_grad(set_to_none=True)
            return model, notes
        except TypeTimeout:
            raise
        except Exception as err:
            raise StageError("build", err) from err

    (model, notes), dropped = _with_retries(make, TINY)
    return model, {"dropped_keys": dropped, **notes}


# ----------------------------------------------------------------------------------------------------- checks


def _output_head(model):
    """``model.get_output_embeddings()``, or ``None`` when the model has none (or no such method)."""
    try:
        return model.get_output_embeddings()
    except Exception:  # a model without the accessor
        return None


def matmul_share(model) -> tuple[float, list[str]]:
    """Share of matmul weights held in 4 bits, and the names of the others.

    Matmul weights: parameters with at least two dimensions over 1 (so not RWKV's ``(1, 1, hidden)`` mixing
    vectors), but embeddings, convolutions (Mamba's depthwise ``conv1d``), the output head and biases. A 4-bit weight
    counts its logical size.
    """
    import bitsandbytes as bnb
    import torch

    head = _output_head(model)
    skip = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    skip |= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    skip |= {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd) for p in m.parameters()}
    four = full = 0
    left = []
    for name, p in model.named_parameters():
        packed = isinstance(p, bnb.nn.Params4bit)
        matrix = packed or sum(d > 1 for d in p.shape) >= 2  # not a (1, 1, hidden) mixing vector
        if id(p) in skip or "lora_" in name or name.endswith("bias") or not matrix:
            continue
        if packed:
            four += p.numel() * 2 * (p.element_size() if p.dtype != torch.uint8 else 1)
        else:
            full += p.numel()
            left.append(name)
    patterns = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in left})
    return four / max(four + full, 1), patterns


def forward_backward(model, vocab: int, stage: dict) -> float:
    """One forward with labels and one backward; returns the loss (``stage["name"]`` follows along)."""
    import torch

    ids = torch.randint(3, max(4, min(vocab, 512)), (2, 16), generator=torch.Generator().manual_seed(0))
    stage["name"] = "forward"
    kwargs = {"labels": ids, "use_cache": False}  # training: no KV cache
    while True:
        try:
            out = model(input_ids=ids, **kwargs)
            break
        except TypeError as err:  # a forward without that argument
            unknown = [k for k in kwargs if k in str(err)]
            if not unknown:
                raise
            kwargs.pop(unknown[0])
    loss = getattr(out, "loss", None)
    if loss is None:
        logits = out.logits if hasattr(out, "logits") else out[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if not torch.isfinite(loss):
        raise Failure(f"the loss is {loss.item()}")
    stage["name"] = "backward"
    loss.backward()
    return float(loss)


def baseline(directory: Path, vocab: int) -> str:
    """``ok`` or the first line of the error when the same checkpoint runs in plain transformers (fp32, no LoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        model.train()
        forward_backward(model, vocab, {})
        return "ok"
    except TypeTimeout:
        raise
    except Exception as err:
        return one_line(err)


def try_type(model_type: str, root: Path, timeout: int) -> dict:
    """Everything for one model type (see the module docstring); never raises but for the alarm."""
    import torch

    from lightning_qlora.lora.experts import inject_expert_lora
    from lightning_qlora.lora.layer import LoRAConfig, inject_lora, mark_only_lora_trainable
    from lightning_qlora.models.sources import load_causal_lm
    from lightning_qlora.quantization.nf4 import QuantizationConfig, is_4bit_linear

    stage = {"name": "config"}
    result: dict = {}
    directory = root / model_type.replace("/", "_")
    try:
        try:
            model, notes = tiny_model(model_type)
        except StageError as err:
            stage["name"] = err.stage
            raise err.original from None
        result.update(notes)
        vocab = getattr(_text_config(model.config), "vocab_size", None) or 512
        stage["name"] = "build"
        params = sum(p.numel() for p in model.parameters())
        result["model_class"] = type(model).__name__
        result["parameters"] = params
        if params > MAX_PARAMS:
            why = (
                f"the config rejected {', '.join(notes['dropped_keys'])}"
                if notes["dropped_keys"]
                else ("a sub-model keeps its full size")
            )
            result.update(status="skipped", stage="build",
                          reason=f"not tiny: {params / 1e6:.0f}M parameters ({why})")  # fmt: skip
            return result
        model.save_pretrained(directory)
        del model
        stage["name"] = "load"
        model = load_causal_lm(directory, QuantizationConfig(compute_dtype=torch.float32), dtype=torch.float32)
        share, left = matmul_share(model)
        result["share_4bit"], result["full_precision"] = share, left[:8]
        result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        head = _output_head(model)
        head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        result["head"] = head_name
        result["head_in_4bit"] = head is not None and is_4bit_linear(head)
        stage["name"] = "lora"
        linears = inject_lora(model, LoRAConfig(r=4))
        stacks = inject_expert_lora(model, LoRAConfig(r=4))
        trainable = mark_only_lora_trainable(model)
        result["adapted_linears"], result["adapted_expert_stacks"] = len(linears), len(stacks)
        result["head_adapted"] = head_name in linears
        if not trainable:
            raise Failure("no trainable adapter parameter")
        result["loss"] = forward_backward(model, vocab, stage)
        adapters = [p for n, p in model.named_parameters() if p.requires_grad]
        with_grad = [p for p in adapters if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        if not with_grad:
            raise Failure(f"none of the {len(adapters)} adapter tensors received a gradient")
        if not all(bool(torch.isfinite(p.grad).all()) for p in with_grad):
            raise Failure("non-finite adapter gradients")
        result["adapters_with_grad"] = f"{len(with_grad)}/{len(adapters)}"
        result["status"] = "ok"
    except TypeTimeout:
        result.update(status="failed", stage=stage["name"], reason=f"timed out after {timeout} s")
    except Exception as err:
        skipped = stage["name"] == "config"
        result.update(
            status="skipped" if skipped else "failed", stage=stage["name"], reason=one_line(err), **where(err)
        )
        if stage["name"] in ("load", "lora", "forward", "backward") and directory.is_dir():
            try:
                result["plain_transformers"] = baseline(directory, vocab)
            except TypeTimeout:
                result["plain_transformers"] = f"timed out (within the {timeout} s of the type)"
    return result


def worker(jsonl: Path, types: list[str], timeout: int) -> None:
    """Run ``types`` in turn in this process, appending a start and a result line per type to ``jsonl``."""
    import shutil
    import warnings

    import torch
    import transformers

    torch.set_num_threads(1)  # one core per worker process
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    import logging

    logging.getLogger("lightning_qlora").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _on_alarm)
    root = Path(tempfile.mkdtemp(prefix="sweep-"))
    with jsonl.open("a") as log:
        for model_type in types:
            log.write(json.dumps({"type": model_type, "event": "start", "time": time.time()}) + "\n")
            log.flush()
            start = time.perf_counter()
            signal.alarm(timeout)
            try:
                result = try_type(model_type, root, timeout)
            except TypeTimeout:  # the alarm went off after try_type's own handler (in the baseline run)
                result = {"status": "failed", "stage": "baseline", "reason": f"timed out after {timeout} s"}
            finally:
                signal.alarm(0)
            result["seconds"] = round(time.perf_counter() - start, 1)
            log.write(json.dumps({"type": model_type, "event": "result", **result}) + "\n")
            log.flush()
            shutil.rmtree(root / model_type.replace("/", "_"), ignore_errors=True)
            gc.collect()


# ----------------------------------------------------------------------------------------------------- driver


def read_events(jsonl: Path) -> list[dict]:
    """The complete lines of a worker's log."""
    if not jsonl.is_file():
        return []
    events = []
    for line in jsonl.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return events


def versions() -> dict:
    """Library versions and the machine, for the footer."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    machine = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "machine": machine}  # fmt: skip


def sweep(types: list[str], out: Path, workers: int, timeout: int, max_minutes: float, done: dict) -> dict:
    """Run ``types`` in ``workers`` processes; the merged results (with ``done``) are rewritten to ``out``."""
    scratch = Path(tempfile.mkdtemp(prefix="sweep-logs-"))
    lists = [types[i::workers] for i in range(workers)]
    results: dict = {k: v for k, v in done.items() if not k.startswith("_")}
    began = time.time()
    before = done.get("_meta", {}).get("seconds", 0)
    meta = {"types": len(types) + len(results), "workers": workers, "timeout_s": timeout, **versions()}
    slots = []
    for i, todo in enumerate(lists):
        slots.append({"todo": list(todo), "proc": None, "log": None, "restarts": 0, "i": i})

    def launch(slot):
        slot["log"] = scratch / f"worker{slot['i']}-{slot['restarts']}.jsonl"
        cmd = [sys.executable, __file__, "--worker", str(slot["log"]), "--timeout", str(timeout), *slot["todo"]]
        slot["stderr"] = (scratch / f"worker{slot['i']}-{slot['restarts']}.err").open("w")
        slot["proc"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slot["stderr"], start_new_session=True)

    def save():
        meta["seconds"] = before + round(time.time() - began)
        out.write_text(json.dumps({"_meta": meta, **dict(sorted(results.items()))}, indent=1))

    for slot in slots:
        if slot["todo"]:
            launch(slot)
    while any(s["proc"] is not None for s in slots):
        time.sleep(2)
        for slot in slots:
            proc = slot["proc"]
            if proc is None:
                continue
            current = None
            for event in read_events(slot["log"]):
                if event["event"] == "start":
                    current = event
                elif event["type"] not in results:
                    results[event["type"]] = {k: v for k, v in event.items() if k not in ("type", "event")}
                    print(f"{event['type']:32s} {event['status']:8s} {event.get('stage', '')} "
                          f"{event.get('reason', '')[:100]}", flush=True)  # fmt: skip
                    save()
            if current is not None and current["type"] in results:
                current = None
            overdue = current is not None and time.time() - current["time"] > timeout + 60
            overtime = time.time() - began > max_minutes * 60
            if proc.poll() is None and not overdue and not overtime:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            slot["stderr"].close()
            slot["todo"] = [t for t in slot["todo"] if t not in results]
            if current is not None and not overtime:
                if overdue:
                    reason = f"stuck for {timeout + 60} s (native code; the process was killed)"
                else:
                    tail = Path(slot["stderr"].name).read_text().strip().splitlines()[-1:]
                    reason = f"the process died (exit {proc.returncode}){': ' + tail[0][:160] if tail else ''}"
                results[current["type"]] = {"status": "failed", "stage": "crash", "reason": reason,
                                            "seconds": round(time.time() - current["time"], 1)}  # fmt: skip
                print(f"{current['type']:32s} failed   crash {reason}", flush=True)
                slot["todo"] = [t for t in slot["todo"] if t != current["type"]]
                save()
            slot["proc"] = None
            if current is None and slot["todo"] and not overtime and proc.returncode != 0:
                for t in slot["todo"]:  # the process exits before starting a type: do not loop on it
                    results[t] = {"status": "not run", "reason": f"the worker exited with {proc.returncode}"}
                slot["todo"] = []
                save()
            if slot["todo"] and not overtime:
                slot["restarts"] += 1
                launch(slot)
    for t in types:
        if t not in results:
            results[t] = {"status": "not run", "reason": f"the sweep stopped after {max_minutes} minutes"}
    save()
    return results


# ----------------------------------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    text = re.sub(r"/\S*/sweep-[^/\s]+/[^:\s]+: ", "", str(text))  # the temporary checkpoint folder
    return " ".join(text.split()).replace("|", "\\|")


def _is_router_weight(name: str) -> bool:
    """Whether a parameter name is a router's weight (by the library's router names)."""
    from lightning_qlora.quantization.shells import ROUTER_NAMES

    parts = name.split(".")
    return len(parts) > 1 and (parts[-2] in ROUTER_NAMES or "router" in parts[:-1])


def _share(value: float | None) -> str:
    if value is None:
        return "?"
    return "100 %" if value >= 0.99995 else f"{100 * value:.1f} %"


def ours(result: dict) -> bool:
    """Whether a failure is with this library: after the model ran in plain transformers, and it still does."""
    return result.get("stage") in ("load", "lora", "forward", "backward") and result.get("plain_transformers") in (
        "ok",
        None,
    )


def markdown(data: dict, command: str) -> str:
    """The generated section: counts, the working types, tables of the failing and skipped ones, the footer."""
    meta = data.get("_meta", {})
    results = {k: v for k, v in data.items() if not k.startswith("_")}
    by = {s: sorted(t for t, r in results.items() if r.get("status") == s) for s in ("ok", "failed", "skipped")}
    with_us = [t for t in by["failed"] if ours(results[t])]
    alone = [t for t in by["failed"] if not ours(results[t])]
    not_run = sorted(t for t, r in results.items() if r.get("status") == "not run")
    lines = [
        f"Of the {len(results)} model types in transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: **{len(by['ok'])} "
        f"work**, **{len(by['failed'])} fail** ({len(with_us)} with lightning_qlora while plain transformers runs "
        f"them, {len(alone)} in transformers alone with the tiny sizes), **{len(by['skipped'])} skipped** (no tiny "
        f"config or model){f', {len(not_run)} not run' if not_run else ''}.",
        "",
        "**Working** (share of matmul weights in 4 bits; *E*: expert stacks quantized and adapted; *as X*: tested "
        "through its text model):",
        "",
    ]
    items = []
    for t in by["ok"]:
        r = results[t]
        note = [f"as `{r['tested_as']}`"] if r.get("tested_as") else []
        note += ["E"] if r.get("adapted_expert_stacks") else []
        items.append(f"`{t}` {_share(r.get('share_4bit'))}" + (f" ({', '.join(note)})" if note else ""))
    lines += [", ".join(items) + ".", ""]
    caveats, routers_only = [], []
    for t in by["ok"]:
        r, said = results[t], []
        left = [n for n in r.get("full_precision", []) if not _is_router_weight(n)]
        if left:
            said.append("full precision: " + ", ".join(f"`{n}`" for n in left))
        elif r.get("full_precision"):
            routers_only.append(t)
        if r.get("head_in_4bit") or r.get("head_adapted"):
            kinds = " and ".join(
                k for k, v in (("quantized", r.get("head_in_4bit")), ("adapted", r.get("head_adapted"))) if v
            )
            said.append(f"the output head `{r.get('head')}` is {kinds}")
        if said:
            caveats.append(f"- `{t}`: " + "; ".join(said))
    if routers_only:
        lines += [f"In {len(routers_only)} of the working types the routers are the only matrices left in full "
                  "precision (by design).", ""]  # fmt: skip
    if caveats:
        lines += ["Working types with other matrices left in full precision (the share counts every parameter with "
                  "two dimensions over 1, so also matrices that are not matmul weights, such as Mamba's `A_log`), "
                  "or whose output head is quantized or adapted:", "", *caveats, ""]  # fmt: skip
    if with_us:
        lines += ["**Failing with lightning_qlora** (plain transformers trains the same checkpoint; stage *load*: "
                  "`load_causal_lm`, *lora*: injecting adapters, *forward*/*backward*: one training step):", "",
                  "| model type | stage | first line of the error | where in lightning_qlora |",
                  "|---|---|---|---|"]  # fmt: skip
        for t in with_us:
            r = results[t]
            name = f"`{t}`" + (f" (as `{r['tested_as']}`)" if r.get("tested_as") else "")
            frame = f"`{r['lightning_qlora_frame']}`" if r.get("lightning_qlora_frame") else "-"
            lines.append(f"| {name} | {r.get('stage')} | {_cell(r.get('reason', ''))} | {frame} |")
        lines += [""]
    if alone:
        lines += ["**Failing in transformers alone** with the tiny sizes (*config*/*build*: building the tiny config "
                  "or model, or one plain forward + backward; other stages: the saved checkpoint fails in plain "
                  "transformers too), so not a verdict on lightning_qlora:", "",
                  "| model type | stage | first line of the error |", "|---|---|---|"]  # fmt: skip
        for t in alone:
            r = results[t]
            name = f"`{t}`" + (f" (as `{r['tested_as']}`)" if r.get("tested_as") else "")
            lines.append(f"| {name} | {r.get('stage')} | {_cell(r.get('reason', ''))} |")
        lines += [""]
    if by["skipped"]:
        lines += ["**Skipped** (no tiny config, or a model that stays large with the tiny keys):", "",
                  "| model type | why |", "|---|---|"]  # fmt: skip
        lines += [f"| `{t}` | {_cell(results[t].get('reason', ''))} |" for t in by["skipped"]]
        lines += [""]
    if not_run:
        lines += ["Not run: " + ", ".join(f"`{t}`" for t in not_run) + ".", ""]
    lines.append(
        f"Generated by `{command}` with torch {meta.get('torch')}, transformers {meta.get('transformers')}, peft "
        f"{meta.get('peft')}, bitsandbytes {meta.get('bitsandbytes')} on a {meta.get('machine')}: "
        f"{meta.get('workers')} processes, {meta.get('timeout_s')} s per type, "
        f"{meta.get('seconds', 0) / 60:.0f} minutes in all."
    )
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace the sweep section of ``path`` (appended when its markers are absent); the rest is kept."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from architecture_worker import write_section as write_between  # the table's writer: one home for both

    write_between(path, START, body, END)


def main() -> None:
    """See the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", help="model types (default: every causal-LM type of transformers)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lightning_qlora_models_sweep.json")
    parser.add_argument("--markdown", type=Path, help="write the generated sweep section of this file")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model type")
    parser.add_argument("--max-minutes", type=float, default=25.0, help="stop the sweep after this long")
    parser.add_argument("--render", type=Path, help="only rewrite --markdown from this results JSON")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out, run the others")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.types, args.timeout)
        return
    if args.render:
        data = json.loads(args.render.read_text())
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        done = {}
        if args.resume and args.out.is_file():
            done = {k: v for k, v in json.loads(args.out.read_text()).items() if v.get("status") != "not run"}
        sweep([t for t in types if t not in done], args.out, args.workers, args.timeout, args.max_minutes, done)
        data = json.loads(args.out.read_text())
        print(f"results: {args.out}")
    if args.markdown:
        target = args.markdown
        write_section(target, markdown(data, f"python docs/models_sweep.py --markdown {target}"))
        print(f"{target}: sweep section written")


if __name__ == "__main__":
    main()
