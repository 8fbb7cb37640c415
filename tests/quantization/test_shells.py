"""4-bit shells chosen module by module: nn.Linear subclasses and GPT-2 Conv1D, whatever the import order."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_qlora.plugins import NF4Precision
from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight, is_4bit_linear
from lightning_qlora.quantization.shells import quantize_model

ORIGINAL_LINEAR = nn.Linear


class ScaledLinear(nn.Linear):
    """A subclass that post-processes the linear map (calls super().forward), like a router."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = 3.0

    def forward(self, x):
        return super().forward(x) * self.scale


class ReimplementedLinear(nn.Linear):
    """A subclass that writes the linear map out itself (as Falcon's FalconLinear does)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def _block(cls_a: type, cls_b: type) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(cls_a(64, 128), nn.ReLU(), cls_b(128, 64))


def _reference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block computed in float32 with each layer's dequantized 4-bit weight (and its own post-processing)."""
    h = x
    for layer in block:
        if is_4bit_linear(layer):
            w = dequantize_weight(layer, torch.float32)
            out = h @ w.T + layer.bias.float()
            h = out * layer.scale if isinstance(layer, ScaledLinear) else out
        else:
            h = layer(h)
    return h


def test_subclasses_keep_their_behaviour_and_are_quantized():
    block = _block(ScaledLinear, ReimplementedLinear)
    quantize_model(block, QuantizationConfig(compute_dtype=torch.float32))
    assert all(is_4bit_linear(block[i]) and isinstance(block[i].weight, bnb.nn.Params4bit) for i in (0, 2))
    assert isinstance(block[0], ScaledLinear) and block[0].scale == 3.0  # its forward (and attributes) stay
    assert not isinstance(block[2], ReimplementedLinear)  # its forward would read packed codes: a plain 4-bit layer
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference(block, x), rtol=1e-5, atol=1e-5)
    assert nn.Linear is ORIGINAL_LINEAR  # no class was patched


def test_conv1d_is_transposed_once_and_quantized():
    torch.manual_seed(0)
    conv = Conv1D(96, 64)  # nf=96 outputs, nx=64 inputs; weight stored 64 x 96
    model = nn.Sequential(conv)
    x = torch.randn(3, 64)
    quantize_model(model, QuantizationConfig(compute_dtype=torch.float32))
    layer = model[0]
    assert is_4bit_linear(layer) and (layer.in_features, layer.out_features) == (64, 96)
    packed, _ = bnb.functional.quantize_4bit(conv.weight.data.t().contiguous(), blocksize=64, quant_type="nf4",
                                             compress_statistics=True)  # fmt: skip
    assert torch.equal(layer.weight.data, packed)  # bitsandbytes' own codes of the out x in matrix
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ dequantize_weight(layer).T + conv.bias, rtol=1e-5, atol=1e-5)


def test_init_context_handles_classes_defined_before_and_after_and_never_patches():
    plugin = NF4Precision(compute_dtype="fp32")
    with plugin.module_init_context():
        assert nn.Linear is ORIGINAL_LINEAR and torch.nn.modules.linear.Linear is ORIGINAL_LINEAR

        class DefinedInside(nn.Linear):  # a model file imported while the context is open
            def forward(self, x):
                return super().forward(x) + 1.0

        first = _block(ScaledLinear, DefinedInside)
        second = nn.Sequential(Conv1D(64, 64), ReimplementedLinear(64, 64))  # another "architecture", same process
    for model in (first, second):
        assert all(layer.weight.device.type == "meta" for layer in model if hasattr(layer, "weight"))
        plugin.convert_module(model)
        assert all(isinstance(layer.weight, bnb.nn.Params4bit) for layer in model if hasattr(layer, "weight"))
    assert isinstance(first[0], ScaledLinear) and isinstance(first[2], DefinedInside)
    h = torch.randn(2, 128)
    with torch.no_grad():  # the subclass defined inside the block keeps its own forward over the 4-bit weight
        expected = h @ dequantize_weight(first[2]).T + first[2].bias + 1.0
        torch.testing.assert_close(first[2](h), expected, rtol=1e-5, atol=1e-5)
    plain = nn.Linear(8, 8)  # after the block: an ordinary layer again
    assert type(plain) is ORIGINAL_LINEAR and plain.weight.device.type == "cpu"


def test_dotted_skip_patterns_match_whole_trailing_components():
    from lightning_qlora.quantization.nf4 import is_skipped

    assert is_skipped("model.layers.0.self_attn.indexer.weights_proj", ["indexer.weights_proj"])
    assert not is_skipped("model.layers.0.self_attn.myindexer.weights_proj", ["indexer.weights_proj"])
    assert is_skipped("lm_head", ["lm_head"]) and is_skipped("a.b.q_proj", ["q_proj"])


class _NamedHead(nn.Module):
    """A model that says which layer is its head (as transformers models do), with an inner layer named output."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"output": nn.Linear(64, 64)})
        self.head = nn.Linear(64, 128)

    def get_output_embeddings(self):
        return self.head


def test_the_head_is_known_by_identity_not_by_name():
    from lightning_qlora.lora.layer import LoRAConfig, find_lora_targets

    model = _NamedHead()
    assert find_lora_targets(model, LoRAConfig(r=4)) == ["block.output"]  # the inner "output" is an ordinary layer
    assert quantize_model(model) == ["block.output"]
    assert type(model.head) is nn.Linear and is_4bit_linear(model.block["output"])


def test_the_out_of_place_guarantee_lets_models_modify_lora_outputs():
    from lightning_qlora.lora.layer import LoRALinear

    layer = LoRALinear(nn.Linear(96, 64).requires_grad_(False), 4, 8)
    x = torch.randn(2, 16, 96, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "LoRALinearFunctionBackward" and out._base is None
    out += 1  # RoCBERT and Falcon add to a projection's output in place
    out.sum().backward()
    assert x.grad is not None and layer.lora_B.grad is not None


class _PlainExperts(nn.Module):
    """Experts whose forward reads the 3-D stacks directly (no transformers experts interface)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 128, 64))
        self.down_proj = nn.Parameter(torch.randn(4, 64, 64))


def test_experts_outside_the_interface_are_refused_in_one_line_unless_skipped():
    import pytest

    from lightning_qlora.lora.experts import inject_expert_lora
    from lightning_qlora.lora.layer import LoRAConfig

    model = nn.Module()
    model.proj = nn.Linear(64, 64)
    model.experts = _PlainExperts()
    with pytest.raises(ValueError, match=r"experts is a _PlainExperts whose forward reads.*skip_modules=\['experts'\]"):
        quantize_model(model)
    assert quantize_model(model, QuantizationConfig(skip_modules=("experts",))) == ["proj"]  # the advice works
    assert model.experts.gate_up_proj.dtype == torch.float32  # left in full precision
    with pytest.warns(UserWarning, match="no adapters on 1 experts modules"):
        assert inject_expert_lora(model, LoRAConfig(r=4)) == []
