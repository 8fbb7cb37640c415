"""What the benchmarks run: the Llama presets, one ``Workload`` per (model, batch shape), token batches, the models.

Shared by ``qlora_vs_hf.py`` (both stacks on the same workload) and ``qlora_70b_step.py`` (ours on the full 70B
architecture). bench/ is a folder of scripts, not a package: import this as ``workloads`` (the script's folder is
on ``sys.path`` when it runs; tests put bench/ there).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LORA = {"r": 64, "alpha": 16, "dropout": 0.05}
"""The QLoRA paper's adapter settings for 33B/65B models, the anchor script's."""
LR = 2e-4
"""AdamW learning rate of the anchor script (and of the QLoRA paper)."""

LLAMA_2_70B: dict[str, Any] = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
}  # fmt: skip
"""Llama-2-70B: 80 layers, hidden 8192, MLP 28672, 64 heads with 8 key/value heads (GQA), vocab 32000."""

# Llama architectures. "tiny" runs on a laptop CPU, "micro" is the unit-test preset, "7b"/"70b-slice" are the anchor's.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "micro": {
        "arch": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 1024, "max_position_embeddings": 256},
        "shapes": [(1, 64)],
        "steps": 3,
    },
    "tiny": {
        "arch": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 256},
        "shapes": [(2, 128)],
        "steps": 6,
    },
    "smollm2-135m": {  # the demo's model (SmolLM2-135M-Instruct): the shapes of the CPU target
        "arch": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                 "rope_theta": 100000.0, "tie_word_embeddings": True},
        "shapes": [(4, 256)],
        "steps": 6,
    },
    "7b": {  # Llama-2-7B
        "arch": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096},
        "shapes": [(4, 1024), (1, 4096), (16, 512)],
        "steps": 8,
    },
    "70b-slice": {  # Llama-2-70B layers; --layers picks how many (80 in the real model: see qlora_70b_step.py)
        "arch": dict(LLAMA_2_70B, num_hidden_layers=4),
        "shapes": [(1, 2048)],
        "steps": 8,
        "layers": [4, 8],
        "full_layers": 80,
    },
}
# fmt: on


@dataclass
class Workload:
    """One (model, batch shape) cell of the table."""

    name: str
    """Row label, e.g. ``tiny 2x128`` or ``70b-slice 4L 1x2048``."""
    model_dir: str
    """The random checkpoint (safetensors) both stacks load."""
    n_params: int
    """All parameters of the base model (for MFU); filled in once the model is built."""
    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence."""
    vocab_size: int
    """Token ids are drawn from ``[0, vocab_size)``."""
    steps: int
    """Training steps run (and timed)."""
    warmup: int
    """Leading steps left out of the median step time."""
    device: str
    """``cpu`` or ``cuda``."""
    seed: int = 0
    """Seed of the weights and of the token batches."""
    layers: int = 0
    """Decoder layers of the model."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    lora_dropout: float = 0.05
    """Dropout on the adapter input, both stacks (the anchor's 0.05 unless ``--lora-dropout``)."""
    checkpoint_mode: str = "full"
    """Ours: ``LoRA(checkpoint_mode=...)``, ``full`` (as the anchor) or ``selective`` (attention kept, not redone);
    ``none``: no gradient checkpointing in either stack."""
    checkpoint_every_n_layers: int = 1
    """Ours: checkpoint one decoder block in this many (``LoRA(checkpoint_every_n_layers=...)``); the anchor keeps
    transformers' checkpointing of every block. More than 1 trades memory for speed (compare the peaks)."""
    compute_dtype: str = "bf16"
    """Both stacks: dequantization, autocast and unquantized weights; ``bf16`` as the anchor script, or ``fp32``."""
    compile_backend: str = "inductor"
    """``ours-compiled``: the ``torch.compile`` backend (``aot_eager`` checks graph capture without code generation)."""


def random_batches(
    steps: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of uniform random token ids from one seeded generator (labels = input_ids, no padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def make_batches(w: Workload) -> list[dict[str, torch.Tensor]]:
    """The same random token batches for both stacks (labels = input_ids, no padding)."""
    return random_batches(w.steps, w.batch_size, w.seq_len, w.vocab_size, w.seed)


def llama_config(arch: dict[str, Any]) -> Any:
    """A ``LlamaConfig`` with ``arch``; the output head untied (as Llama-2) unless ``arch`` ties it (as SmolLM2)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{"tie_word_embeddings": False, **arch})


def build_model_dir(arch: dict[str, Any], path: Path, device: str, seed: int = 0, init_std: float | None = None) -> int:
    """Random bf16 Llama with ``arch``, ``save_pretrained`` (safetensors); returns its parameter count.

    The model is made on the meta device and its storage allocated empty, so neither torch's ``nn.Linear`` init nor
    transformers' ``_init_weights`` runs (two passes over every weight: minutes for 6.7B parameters on a CPU). Then
    it is drawn as transformers' Llama init does: every matrix (embeddings, linears, head) from ``N(0, std²)``, std
    = ``init_std`` or the config's ``initializer_range`` (0.02), every norm weight 1, every bias 0. Each tensor has
    its own generator seeded from ``seed`` and its index, so the weights do not depend on the thread count; on CPU
    the tensors are drawn in a thread pool (one core draws ~120M bf16 values/s).

    Args:
        arch: ``LlamaConfig`` fields.
        path: the folder to write (``config.json``, ``model.safetensors``).
        device: where the weights are drawn (``cpu`` or ``cuda``).
        seed: seed of the draw.
        init_std: std of the matrices (None: the config's ``initializer_range``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from transformers import LlamaForCausalLM

    config = llama_config(arch)
    std = config.initializer_range if init_std is None else init_std
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)  # uninitialised storage; the rotary buffers (not saved) are left unset

    def draw(item: tuple[int, tuple[str, torch.Tensor]]) -> None:
        index, (name, p) = item
        with torch.no_grad():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + index))
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)

    params = list(enumerate(model.named_parameters()))
    if device == "cpu":
        with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
            list(pool.map(draw, params))
    else:
        for item in params:
            draw(item)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def workloads_for(
    preset: str,
    device: str,
    workdir: Path,
    layers: list[int] | None = None,
    shapes: list[tuple[int, int]] | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    init_std: float | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> list[tuple[dict[str, Any], list[Workload]]]:
    """(arch, workloads) per model to build; the model directories are filled in when built."""
    spec = PRESETS[preset]
    layer_counts = layers or spec.get("layers") or [spec["arch"]["num_hidden_layers"]]
    steps = steps or spec["steps"]
    warmup = min(2, steps - 1) if warmup is None else warmup
    out = []
    for count in layer_counts:
        arch = dict(spec["arch"], num_hidden_layers=count)
        tag = preset if count == spec["arch"]["num_hidden_layers"] and "layers" not in spec else f"{preset} {count}L"
        model_dir = str(workdir / f"{preset}-{count}L")
        cells = [
            Workload(
                name=f"{tag} {bs}x{seq}",
                model_dir=model_dir,
                n_params=0,
                batch_size=bs,
                seq_len=seq,
                vocab_size=arch["vocab_size"],
                steps=steps,
                warmup=warmup,
                device=device,
                seed=seed,
                layers=count,
                threads=threads,
            )
            for bs, seq in (shapes or spec["shapes"])
        ]
        out.append((dict(arch, _init_std=init_std), cells))
    return out


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4x1024,1x4096"`` -> ``[(4, 1024), (1, 4096)]``."""
    out = []
    for part in text.split(","):
        bs, _, seq = part.strip().lower().partition("x")
        out.append((int(bs), int(seq)))
    return out
