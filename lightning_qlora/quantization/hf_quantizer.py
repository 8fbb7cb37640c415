"""A transformers quantizer: ``from_pretrained`` loads any causal LM with its matmul weights quantized on arrival.

transformers' own loading does what a checkpoint needs (key renames such as GPT-NeoX's ``embed_out``, per-expert
files fused into 3-D stacks, shards, tied weights); its quantizer extension point (``HfQuantizer``, registered as
``"lightning_qlora"``) is told, tensor by tensor, which ones to quantize. Before loading, the linear-like modules
become empty 4-bit shells (:mod:`lightning_qlora.quantization.shells`); each weight and each expert stack is
quantized the moment it is read, in the model's dtype, so peak memory is the 4-bit model plus the tensor in hand.
bitsandbytes' own ``Bnb4BitHfQuantizer`` converts only exact ``nn.Linear`` and ``Conv1D`` layers and leaves expert
stacks in full precision; this one covers subclasses and experts, with the same bits per weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from lightning_qlora.quantization.experts import expert_stacks, quantize_stack, stack_names, use_experts_forward
from lightning_qlora.quantization.nf4 import QuantizationConfig, guard_cpu_repack, make_params4bit
from lightning_qlora.quantization.shells import arrived_weight, to_shells

METHOD = "lightning_qlora"


@register_quantization_config(METHOD)
class QLoRAQuantizationConfig(QuantizationConfigMixin):
    """``from_pretrained(quantization_config=...)`` for NF4 + double quant on load.

    Args:
        config: the 4-bit settings.
        device: where weights are quantized (the training device).
    """

    def __init__(self, config: QuantizationConfig | None = None, device: torch.device | str = "cpu", **_: Any) -> None:
        self.quant_method = METHOD
        self.config = config or QuantizationConfig()
        self.device = torch.device(device)
        self.errors: list[str] = []
        """Why tensors could not be quantized (transformers reports conversion failures only in its log)."""

    def __deepcopy__(self, memo: dict) -> QLoRAQuantizationConfig:
        return self  # transformers copies the config it is given; the errors must reach the caller's object

    def to_dict(self) -> dict[str, Any]:
        """Plain data (transformers writes it into ``config.json`` and model cards)."""
        return {"quant_method": METHOD, **self.config.describe()}


class QuantizeOnArrival(ConversionOps):
    """The op transformers runs on each tensor the quantizer claimed: quantize it to 4 bits where it lands."""

    def __init__(self, quantizer: QLoRAQuantizer) -> None:
        self.quantizer = quantizer

    def convert(
        self, input_dict: dict[str, Any], full_layer_name: str | None = None, model: nn.Module | None = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        """``{name: Params4bit}`` for ``{name: full-precision tensor}``.

        Raises:
            ValueError: when a tensor does not fit its layer.
        """
        settings: QLoRAQuantizationConfig = self.quantizer.quantization_config
        out = {}
        for name, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            if name in self.quantizer.stacks:
                out[name] = quantize_stack(tensor, settings.config, settings.device)
                continue
            try:
                weight = make_params4bit(arrived_weight(module, tensor), settings.config, settings.device)
            except ValueError as err:
                settings.errors.append(f"{name}: {err}")
                raise
            weight.module = module
            module.quant_state = weight.quant_state
            module._is_hf_initialized = True
            out[name] = weight
        return out


@register_quantizer(METHOD)
class QLoRAQuantizer(HfQuantizer):
    """Shells before loading, quantize on arrival, experts routed through the 4-bit experts forward after."""

    requires_calibration = False

    def __init__(self, quantization_config: QLoRAQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.pre_quantized = False  # the checkpoint holds full-precision weights
        self.stacks: set[str] = set()
        """Full names of the expert stacks quantized on arrival."""
        self.shells: list[str] = []
        """Names of the linear-like modules replaced by 4-bit shells."""

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        settings: QLoRAQuantizationConfig = self.quantization_config
        config = settings.config
        keep = [*(getattr(model, "_keep_in_fp32_modules", None) or []),
                *(getattr(model, "_keep_in_fp32_modules_strict", None) or [])]  # fmt: skip
        if keep:
            config = QuantizationConfig(**{**config.__dict__, "skip_modules": (*config.skip_modules, *keep)})
        self.shells = to_shells(model, config, settings.device)
        for name, module in expert_stacks(model, skip=config.skip_modules):
            self.stacks |= {f"{name}.{stack}" for stack in stack_names(module)}

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        """Shell weights and expert stacks (biases and everything else load as they are)."""
        if param_name in self.stacks:
            return True
        module, tensor_name = get_module_from_name(model, param_name)
        return tensor_name == "weight" and getattr(module, "quantization_config", None) is not None

    def get_quantize_ops(self) -> ConversionOps:
        """See :class:`QuantizeOnArrival`."""
        return QuantizeOnArrival(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        guard_cpu_repack(model)
        if self.stacks:
            use_experts_forward(model)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        """4-bit checkpoints are not written through transformers (adapters are exported in PEFT format)."""
        return False

    @property
    def is_trainable(self) -> bool:
        """The frozen 4-bit base trains adapters."""
        return True

    @property
    def quantized_element_size(self) -> float:
        """Bytes per quantized weight for transformers' memory estimates (4 bits; the constants are small)."""
        return 0.5
