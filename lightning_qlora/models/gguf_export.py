"""Write a transformers causal LM (a merged fine-tune) as a GGUF file for llama.cpp and Ollama, plus a Modelfile.

Tensors get llama.cpp's names from the ``gguf`` package's own map (``gguf.get_tensor_name_map``); hyperparameters,
tokenizer and chat template go into the metadata as llama.cpp's ``convert_hf_to_gguf.py`` writes them, so
llama.cpp, Ollama and transformers' GGUF loader (``from_pretrained(..., gguf_file=...)``) read the file back. For
the ``llama`` architecture the rows of ``q_proj``/``k_proj`` are reordered as llama.cpp's converter does (its rotary
embedding pairs neighbouring dimensions, transformers' pairs the two halves of each head); Qwen2/Qwen3 are written
as they are. 1-D tensors (norms, biases) stay float32; matrices are stored in ``bf16``, ``f16`` or ``q8_0`` (blocks
of 32 weights with one fp16 scale: ``w ≈ d·q``, ``d = max|w|/127``, ``q = round(w/d)``; rows whose length is not a
multiple of 32 fall back to f16, as llama.cpp does). The file is written tensor by tensor (peak memory: the model
plus one converted tensor) into a folder that replaces the old one only when complete.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.models.gguf_vocab import MODELFILE_NAME, add_tokenizer, ollama_modelfile, tokenizer_model
from lightning_qlora.quantization.nf4 import dequantize_weight, is_4bit_linear
from lightning_qlora.utils.atomic import atomic_directory

GGUF_FILE_NAME = "model.gguf"
GGUF_DTYPES = ("bf16", "f16", "q8_0")
"""Storage of the matrices: bfloat16, float16, or llama.cpp's 8-bit blocks (Q8_0)."""


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one transformers ``model_type`` is written."""

    name: str
    """llama.cpp's architecture name (``general.architecture``)."""
    permute_qk: bool
    """Reorder the rows of ``q_proj``/``k_proj`` for llama.cpp's rotary layout (``LlamaModel.permute``)."""
    rope_freqs: bool
    """Llama 3 rope scaling goes in as a ``rope_freqs`` tensor of per-frequency divisors."""


GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("llama", permute_qk=True, rope_freqs=True),
    "mistral": GGUFArchitecture("llama", permute_qk=True, rope_freqs=True),  # llama.cpp converts Mistral as llama
    "qwen2": GGUFArchitecture("qwen2", permute_qk=False, rope_freqs=False),
    "qwen3": GGUFArchitecture("qwen3", permute_qk=False, rope_freqs=False),
}
"""The ``model_type`` values :func:`export_gguf` writes."""


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    """The GGUF file."""
    modelfile: Path
    """The Ollama ``Modelfile`` beside it."""
    architecture: str
    """llama.cpp's architecture name."""
    dtype: str
    """Storage of the matrices (``bf16``, ``f16`` or ``q8_0``)."""
    tensor_types: dict[str, int] = field(default_factory=dict)
    """``{ggml type: number of tensors}`` (norms and biases are F32; q8_0 rows not a multiple of 32 are F16)."""
    file_bytes: int = 0
    """Size of the GGUF file."""


def gguf_architecture(config: Any) -> GGUFArchitecture:
    """The GGUF architecture of a transformers config, checked for what the writer supports.

    Raises:
        ValueError: for a ``model_type`` without a mapping (naming it and the supported ones), a non-SiLU MLP, a
            sliding window, partial rotary embeddings or a rope scaling llama.cpp cannot be told about.
    """
    model_type = getattr(config, "model_type", None)
    arch = GGUF_ARCHITECTURES.get(str(model_type))
    supported = ", ".join(sorted(GGUF_ARCHITECTURES))
    if arch is None:
        raise ValueError(
            f"GGUF export does not support model_type {model_type!r} (supported: {supported}); "
            "export --format safetensors and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (llama.cpp's {arch.name} uses silu)")
    if getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    rope = _rope_parameters(config)
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ("default", "linear") and not (rope_type == "llama3" and arch.rope_freqs):
        problems.append(f"rope_type={rope_type!r}")
    if problems:
        raise ValueError(
            f"GGUF export of {model_type} does not support {', '.join(problems)}; "
            "export --format safetensors and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return arch


def _rope_parameters(config: Any) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) or the older ``rope_scaling`` + ``rope_theta``."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def llama3_rope_factors(config: Any) -> torch.Tensor:
    """Llama 3 rope scaling as llama.cpp's ``rope_freqs``: the divisor of each default frequency ``θ^(-2i/d)``."""
    rope = _rope_parameters(config)
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    mixed = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_context / high, torch.ones_like(freqs), mixed)
    return torch.where(wavelen > old_context / low, torch.full_like(freqs, factor), out).float()


def _hyperparameters(writer: Any, config: Any, arch: GGUFArchitecture, n_vocab: int) -> None:
    """The ``<arch>.*`` keys llama.cpp reads (and transformers' GGUF loader maps back to the config)."""
    rope = _rope_parameters(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    if rope.get("rope_type", rope.get("type")) == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: per head, rows ``(half, pair)`` become ``(pair, half)``."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _hf_tensors(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """``(name, shape, load)`` for each distinct tensor of ``model`` (tied ones once; 4-bit weights dequantized).

    Raises:
        ValueError: if ``model`` still has LoRA layers.
    """
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, LoRALinear):
            raise ValueError(f"{prefix} is a LoRA layer; merge the adapters (merge_lora) before the GGUF export")
        dot = f"{prefix}." if prefix else ""
        params = dict(module.named_parameters(recurse=False))
        if is_4bit_linear(module):
            seen.add(id(params.pop("weight")))
            shape = (module.out_features, module.in_features)
            yield f"{dot}weight", shape, lambda m=module: dequantize_weight(m, torch.float32)
        for name, param in params.items():
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{dot}{name}", tuple(param.shape), lambda p=param: p.detach().float()


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    qtype: Any
    load: Callable[[], torch.Tensor]


def _plan(model: nn.Module, arch: GGUFArchitecture, dtype: str) -> list[_Planned]:
    """Every tensor of the file with its llama.cpp name and type, checked before anything is written.

    Raises:
        ValueError: for a tensor llama.cpp's architecture has no name for.
    """
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    n_layers = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(arch_id, n_layers)
    allowed = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[arch_id] for b in range(n_layers)}
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    matrix = {"bf16": gguf.GGMLQuantizationType.BF16, "f16": gguf.GGMLQuantizationType.F16}
    planned = []
    for hf_name, shape, load in _hf_tensors(model):
        stem, _, suffix = hf_name.rpartition(".")
        base = names.get_name(stem)
        if base is None or base not in allowed:
            raise ValueError(
                f"GGUF export: {config.model_type} tensor {hf_name} has no name in llama.cpp's {arch.name} "
                "architecture; export --format safetensors instead"
            )
        if arch.permute_qk and base.endswith((".attn_q", ".attn_k")):
            heads = n_head if base.endswith(".attn_q") else n_kv
            load = lambda load=load, heads=heads: _permute(load(), heads)  # noqa: E731
        name = f"{base}.{suffix}"
        if len(shape) == 1 or name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F32
        elif dtype == "q8_0":
            block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
            qtype = gguf.GGMLQuantizationType.Q8_0 if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16
        else:
            qtype = matrix[dtype]
        planned.append(_Planned(name, shape, qtype, load))
    rope = _rope_parameters(config)
    if arch.rope_freqs and rope.get("rope_type", rope.get("type")) == "llama3":
        factors = llama3_rope_factors(config)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(_Planned(name, tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors))
    return planned


def _encode(tensor: torch.Tensor, qtype: Any) -> np.ndarray:
    """The bytes of one tensor in ``qtype`` (rounding to nearest even for bf16/f16, ggml's Q8_0 for q8_0)."""
    import gguf

    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, qtype)


def _file_type(dtype: str) -> int:
    import gguf

    kinds = {"bf16": "MOSTLY_BF16", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    return int(getattr(gguf.LlamaFileType, kinds[dtype]))


def _write(path: Path, model: nn.Module, tokenizer: Any, arch: GGUFArchitecture, dtype: str, name: str) -> Counter:
    import gguf

    config = model.config
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    planned = _plan(model, arch, dtype)
    writer = gguf.GGUFWriter(str(path), arch.name)
    try:
        writer.add_type("model")
        writer.add_name(name)
        _hyperparameters(writer, config, arch, n_vocab)
        writer.add_file_type(_file_type(dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config, n_vocab)
        for item in planned:
            if item.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                np_dtype = np.float32 if item.qtype == gguf.GGMLQuantizationType.F32 else np.float16
                shape, nbytes = item.shape, math.prod(item.shape) * np.dtype(np_dtype).itemsize
            else:
                np_dtype, shape = np.uint8, gguf.quant_shape_to_byte_shape(item.shape, item.qtype)
                nbytes = math.prod(shape)
            writer.add_tensor_info(item.name, shape, np.dtype(np_dtype), nbytes, raw_dtype=item.qtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in planned:
            writer.write_tensor_data(_encode(item.load(), item.qtype))
    finally:
        writer.close()
    return Counter(item.qtype.name for item in planned)


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    directory: str | os.PathLike,
    dtype: str = "f16",
    name: str | None = None,
) -> GGUFExport:
    """Write ``model`` as ``<directory>/model.gguf`` plus an Ollama ``Modelfile`` (see the module docstring).

    Everything is checked before a byte is written (architecture, tensor names, tokenizer kind); the folder is
    replaced atomically (:func:`lightning_qlora.utils.atomic.atomic_directory`), other files in it are kept.

    Args:
        model: a transformers causal LM with plain (merged) weights; 4-bit layers without an adapter are
            dequantized on the way.
        tokenizer: its fast tokenizer (vocabulary, merges, special tokens and chat template go into the file).
        directory: the output folder.
        dtype: ``"bf16"``, ``"f16"`` or ``"q8_0"``.
        name: ``general.name`` (default: the name a GGUF-sourced base carried, else the model folder's name).

    Returns:
        A :class:`GGUFExport` naming the files.

    Raises:
        ValueError: for an unknown ``dtype``, an architecture or tokenizer the writer does not support, or LoRA
            layers still in ``model``.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(GGUF_DTYPES)}")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"GGUF export needs a transformers model with a .config, got {type(model).__name__}")
    arch = gguf_architecture(config)
    tokenizer_model(tokenizer)  # refuse an unsupported tokenizer before writing
    _plan(model, arch, dtype)  # refuse unmapped tensors (and LoRA layers) before writing
    name = name or getattr(config, "_model_name_or_path", None)  # the name a GGUF-sourced base came with
    name = name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model"
    with atomic_directory(directory, owned=lambda n: n in (GGUF_FILE_NAME, MODELFILE_NAME)) as tmp:
        types = _write(tmp / GGUF_FILE_NAME, model, tokenizer, arch, dtype, name)
        (tmp / MODELFILE_NAME).write_text(ollama_modelfile(tokenizer, config, GGUF_FILE_NAME), encoding="utf-8")
    target = Path(directory).expanduser().resolve()
    path = target / GGUF_FILE_NAME
    return GGUFExport(path, target / MODELFILE_NAME, arch.name, dtype, dict(types), path.stat().st_size)


__all__ = [
    "GGUF_ARCHITECTURES",
    "GGUF_DTYPES",
    "GGUF_FILE_NAME",
    "GGUFArchitecture",
    "GGUFExport",
    "export_gguf",
    "gguf_architecture",
    "llama3_rope_factors",
]
