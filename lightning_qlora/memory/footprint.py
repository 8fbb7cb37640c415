"""What a quantized model really occupies: bits per 4-bit parameter, and bytes by kind of tensor."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_qlora.lora.layer import is_lora_parameter
from lightning_qlora.quantization.experts import EXPERT_PARAMETERS
from lightning_qlora.quantization.linear_probe import is_linear_like
from lightning_qlora.utils.formatting import format_bytes
from lightning_qlora.utils.imports import bitsandbytes
from lightning_qlora.utils.modules import model_root


@dataclass
class Footprint:
    """Bytes held by a model, split by kind."""

    quantized_params: int
    """Number of weights stored in 4 bits."""
    quantized_bytes: int
    """Bytes of the 4-bit codes plus all quantization constants (absmax, nested absmax, code tables, offsets)."""
    unquantized_params: int
    """Parameters kept in full precision (embeddings, norms, biases, output head), adapters excluded."""
    unquantized_bytes: int
    """Bytes of those parameters."""
    adapter_params: int
    """LoRA parameters."""
    adapter_bytes: int
    """Bytes of the LoRA parameters."""
    full_precision_matmul_params: int = 0
    """Matmul weights (linear, ``Conv1D``, expert stacks; the output head excluded) kept in full precision."""

    @property
    def matmul_share_4bit(self) -> float:
        """Share of the matmul weights held in 4 bits (1.0 when every linear and expert stack but the head is)."""
        total = self.quantized_params + self.full_precision_matmul_params
        return self.quantized_params / total if total else 0.0

    @property
    def bits_per_quantized_param(self) -> float:
        """Average storage per 4-bit weight, constants included (NF4+DQ ≈ 4.127, without DQ ≈ 4.5)."""
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    @property
    def total_bytes(self) -> int:
        """Everything the model holds."""
        return self.quantized_bytes + self.unquantized_bytes + self.adapter_bytes

    def as_dict(self) -> dict[str, float]:
        """Fields plus derived numbers, for loggers."""
        out: dict[str, float] = {k: float(v) for k, v in asdict(self).items()}
        out["bits_per_quantized_param"] = self.bits_per_quantized_param
        out["total_bytes"] = float(self.total_bytes)
        out["matmul_share_4bit"] = self.matmul_share_4bit
        return out

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.quantized_params / 1e6:.2f}M params in 4 bits ({self.bits_per_quantized_param:.3f} bits/param, "
            f"{format_bytes(self.quantized_bytes)}), {self.unquantized_params / 1e6:.2f}M unquantized "
            f"({format_bytes(self.unquantized_bytes)}), {self.adapter_params / 1e6:.2f}M adapter "
            f"({format_bytes(self.adapter_bytes)}); {100 * self.matmul_share_4bit:.1f}% of the matmul weights in 4 bits"
        )


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant_state_bytes(state, seen_storage: set[int] | None = None) -> int:
    """Bytes of a bitsandbytes ``QuantState``: absmax, code table, offset, and the nested state when present.

    Tensors whose storage is in ``seen_storage`` (lookup tables bitsandbytes shares between layers) count once.
    """
    seen_storage = set() if seen_storage is None else seen_storage
    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen_storage:
            seen_storage.add(value.untyped_storage().data_ptr())
            total += _tensor_bytes(value)
    nested = getattr(state, "state2", None)
    if getattr(state, "nested", False) and nested is not None:
        total += quant_state_bytes(nested, seen_storage)
    return total


def measure_footprint(model: nn.Module) -> Footprint:
    """Count the bytes of ``model`` by kind (shared tensors are counted once).

    4-bit tensors are every bitsandbytes ``Params4bit`` (linear weights and expert stacks), counted by their logical
    shape; full-precision matmul weights are those of linear-like layers, 3-D expert stacks and any other matrix
    (:func:`is_matrix`) but embeddings, the head excluded.
    """
    bnb = bitsandbytes()
    head_ids = _head_ids(model)
    matmul_ids = {id(m.weight) for m in model.modules() if is_linear_like(m) and isinstance(m.weight, torch.Tensor)}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    shared_tables: set[int] = set()
    q_params = q_bytes = u_params = u_bytes = a_params = a_bytes = fp_matmul = 0
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        state = getattr(param, "quant_state", None)
        if isinstance(param, bnb.nn.Params4bit) and state is not None:
            q_params += math.prod(state.shape)
            q_bytes += _tensor_bytes(param.data) + quant_state_bytes(state, shared_tables)
        elif is_lora_parameter(name):
            a_params += param.numel()
            a_bytes += _tensor_bytes(param)
        else:
            u_params += param.numel()
            u_bytes += _tensor_bytes(param)
            is_stack = param.dim() == 3 and name.rsplit(".", 1)[-1] in EXPERT_PARAMETERS
            counted = id(param) in matmul_ids or is_stack or (is_matrix(param) and id(param) not in embedding_ids)
            if counted and id(param) not in head_ids:
                fp_matmul += param.numel()
    return Footprint(q_params, q_bytes, u_params, u_bytes, a_params, a_bytes, fp_matmul)


def _head_ids(model: nn.Module) -> set[int]:
    """Ids of the output head's parameters (of the network inside a LightningModule)."""
    root = model if hasattr(model, "get_output_embeddings") else model_root(model)
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    return {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()


MIN_MATRIX_SIDE = 64
"""A parameter whose last two dimensions are both at least this is taken for a matmul weight wherever it lives
(Mamba's ``A_log``, ``hidden × 16``, is not; a custom layer's raw ``weight`` matrix or expert stack is)."""


def is_matrix(param: torch.Tensor) -> bool:
    """Whether ``param`` looks like a matmul weight: at least 2-D, its last two dimensions >= ``MIN_MATRIX_SIDE``."""
    return param.dim() >= 2 and min(param.shape[-2:]) >= MIN_MATRIX_SIDE


def unrecognised_matrices(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``(name, owner type)`` of full-precision matrices no loader path can hold in 4 bits or adapt.

    Those are :func:`is_matrix` parameters outside linear-like layers and expert stacks (a custom layer's raw weight,
    JetMoE's ``weight`` stacks), not embeddings or the head, nor in a module ``skip`` names (kept on purpose).
    """
    from lightning_qlora.quantization.nf4 import is_skipped

    bnb = bitsandbytes()
    head_ids = _head_ids(model)
    found = []
    for module_name, module in model.named_modules():
        if is_linear_like(module) or isinstance(module, nn.Embedding) or is_skipped(module_name, skip):
            continue
        for name, param in module.named_parameters(recurse=False):
            if isinstance(param, bnb.nn.Params4bit) or is_lora_parameter(name) or id(param) in head_ids:
                continue
            if is_matrix(param):
                found.append((f"{module_name}.{name}".lstrip("."), type(module).__name__))
    return found
