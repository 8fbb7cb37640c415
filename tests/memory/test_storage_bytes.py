"""Storage rules: the planner's byte counts equal what bitsandbytes really stores."""

import math

import pytest
import torch

from lightning_qlora.memory.footprint import quant_state_bytes
from lightning_qlora.memory.storage_bytes import code_table_bytes, optimizer_bytes, quantized_bytes
from lightning_qlora.quantization.nf4 import QuantizationConfig, make_params4bit


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(("shape", "blocksize"), [((128, 64), 64), ((192, 320), 64), ((64, 1088), 128)])
def test_quantized_bytes_equal_what_bitsandbytes_stores(shape, blocksize, double_quant):
    config = QuantizationConfig(blocksize=blocksize, double_quant=double_quant)
    weight = make_params4bit(torch.randn(*shape), config, "cpu")
    state = weight.quant_state
    stored = weight.data.numel() * weight.data.element_size() + quant_state_bytes(state)
    tables = state.code.numel() * 4 + (state.state2.code.numel() * 4 if double_quant else 0)
    assert code_table_bytes(config) == tables
    assert quantized_bytes(math.prod(shape), config) + tables == stored


def test_optimizer_bytes_by_family():
    sizes = [100_000, 1000]
    assert optimizer_bytes(sizes, "paged_adamw_32bit", torch.float32) == (8 * 101_000, 8 * 100_000)
    total, paged = optimizer_bytes(sizes, "paged_adamw_8bit", torch.float32)
    assert total == 2 * 100_000 + 8 * 391 + 8 * 1000 + 2048 and paged == 2 * 100_000
    assert optimizer_bytes(sizes, "adamw", torch.float32)[0] == 8 * 101_000 + 8
