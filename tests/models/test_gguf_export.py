"""GGUF export, read back by transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``).

Each tiny model gets LoRA adapters with random ``B``, merged in fp32 (the "merged model"). The file must hold exactly
the merged matrices rounded to the chosen format: bf16/f16 bit for bit (round to nearest even), q8_0 equal to an
independent torch recompute of ggml's Q8_0; so the GGUF model's logits equal those of the merged model with its
matrices rounded the same way (1e-5: same weights, same fp32 arithmetic). Against the unrounded merged model the
logits differ only by the format's rounding: tolerances below are a few times the measured error (tiny models,
|logits| ≈ 2-3): f16 keeps 11 significant bits (relative rounding ≤ 2^-11), bf16 8 (≤ 2^-8), q8_0 steps of
max|w|/127 per 32 weights (≤ 1/254 of the block's largest weight).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CHAT_TEMPLATE, CORPUS, build_tiny_llama, tiny_llama_config

from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_modules
from lightning_qlora.lora.merge import merge_lora
from lightning_qlora.models import gguf_export
from lightning_qlora.models.gguf_export import GGUF_FILE_NAME, export_gguf, llama3_rope_factors
from lightning_qlora.models.gguf_vocab import MODELFILE_NAME, ollama_modelfile, ollama_template

TOLERANCE = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 1.5e-1}
"""max |logit(GGUF) - logit(merged fp32)| allowed; measured on these models: f16 ≈ 2e-3, bf16 ≈ 1.5e-2, q8_0 ≈ 5e-2."""
TEXTS = ["The quick brown fox", "Question: What is 2+3? Answer: 5.", "  spaced  out\n\nlines", "<|im_start|>user\nhi"]
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen_tokenizer(path):
    """A byte-level BPE with Qwen2's split regex (llama.cpp's ``qwen2`` pre-tokenizer), 512 tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_qwen(kind: str):
    """Qwen2 (tied head, q/k/v biases, 576 rows for 512 tokens) or Qwen3 (q/k norms; transformers' GGUF loader
    assumes head_dim 128, Qwen3's default, so the tiny model uses it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
    if kind == "qwen2":
        config = Qwen2Config(vocab_size=576, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             eos_token_id=2, pad_token_id=0, **shape)  # fmt: skip
        cls = Qwen2ForCausalLM
    else:
        config = Qwen3Config(vocab_size=512, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                             tie_word_embeddings=False, eos_token_id=2, **shape)  # fmt: skip
        cls = Qwen3ForCausalLM
    torch.manual_seed(3)
    model = cls(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.08) if param.dim() == 2 else param.add_(torch.randn_like(param) * 0.1)
    return model


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(4)
    model = MistralForCausalLM(MistralConfig(**tiny_llama_config().to_dict() | {"model_type": "mistral"}))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.08) if param.dim() == 2 else None
    return model


def merged(model, seed: int = 1):
    """``model`` with adapters on every linear (random B), merged into fp32 weights; in eval mode."""
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    merge_lora(model, "bf16", dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny_tokenizer, tmp_path_factory):
    qwen_tok = qwen_tokenizer(tmp_path_factory.mktemp("qwen_tok"))
    return {
        "llama": (merged(build_tiny_llama()), tiny_tokenizer),
        "qwen2": (merged(tiny_qwen("qwen2")), qwen_tok),
        "qwen3": (merged(tiny_qwen("qwen3")), tiny_tokenizer),
        "mistral": (merged(tiny_mistral()), tiny_tokenizer),  # written as llama.cpp's llama, read back as Llama
    }


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 recomputed in torch: per 32 values ``d = max|w|/127`` (kept as fp16), ``q = round(w·(1/d))``."""
    blocks = weight.float().reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    scaled = blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # ggml rounds halves away from zero
    return (q * d.half().float()).reshape(weight.shape)


def rounded(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    if weight.dim() == 1:
        return weight.float()  # norms and biases are stored as F32
    if dtype == "q8_0":
        return q8_0(weight)
    return weight.to(torch.float16 if dtype == "f16" else torch.bfloat16).float()


def read_back(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE_NAME, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE_NAME)


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("llama", "f16"),
        ("llama", "q8_0"),
        ("qwen2", "f16"),
        ("qwen2", "q8_0"),
        ("qwen3", "bf16"),
        ("mistral", "f16"),
    ],
)
def test_gguf_reads_back_as_the_merged_model_and_tokenizer(models, arch, dtype, tmp_path):
    model, tokenizer = models[arch]
    export_gguf(model, tokenizer, tmp_path, dtype)
    back, back_tokenizer = read_back(tmp_path)
    for text in TEXTS:  # the tokenizer round-trips: same ids, same text, same template and special tokens
        assert back_tokenizer.encode(text) == tokenizer.encode(text), text
        assert back_tokenizer.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert back_tokenizer.chat_template == tokenizer.chat_template
    assert (back_tokenizer.eos_token, back_tokenizer.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    reference = copy.deepcopy(model)
    loaded = back.state_dict()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(rounded(param, dtype))
            assert torch.equal(loaded[name], param), f"{name} is not the merged weight rounded to {dtype}"
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, exact, same_weights = back(ids).logits, model(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, same_weights, rtol=0, atol=1e-5)
    assert (got - exact).abs().max() <= TOLERANCE[dtype], (got - exact).abs().max()


def test_metadata_names_the_architecture_pre_tokenizer_and_hyperparameters(models, tmp_path):
    from gguf import GGUFReader

    export_gguf(models["qwen2"][0], models["qwen2"][1], tmp_path / "qwen2", "q8_0", name="tiny-qwen")
    export_gguf(models["llama"][0], models["llama"][1], tmp_path / "llama", "f16")
    qwen, llama = GGUFReader(tmp_path / "qwen2" / GGUF_FILE_NAME), GGUFReader(tmp_path / "llama" / GGUF_FILE_NAME)
    value = lambda reader, key: reader.fields[key].contents()  # noqa: E731
    assert value(qwen, "general.architecture") == "qwen2" and value(qwen, "general.name") == "tiny-qwen"
    assert value(qwen, "tokenizer.ggml.pre") == "qwen2" and value(llama, "tokenizer.ggml.pre") == "gpt-2"
    assert value(qwen, "general.file_type") == 7 and value(llama, "general.file_type") == 1
    assert value(qwen, "tokenizer.ggml.tokens")[-1] == "[PAD575]"  # 576 rows, 512 tokens
    assert "output.weight" not in {t.name for t in qwen.tensors}  # tied head: written once
    config = models["llama"][0].config
    assert value(llama, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert value(llama, "llama.rope.dimension_count") == config.hidden_size // config.num_attention_heads
    assert value(llama, "llama.context_length") == config.max_position_embeddings
    assert value(llama, "tokenizer.ggml.eos_token_id") == models["llama"][1].eos_token_id


def test_unmerged_4bit_layers_are_dequantized(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from lightning_qlora.models.sources import load_causal_lm
    from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight

    model = load_causal_lm(tiny_llama_dir, QuantizationConfig(compute_dtype=torch.float32), dtype=torch.float32).eval()
    export_gguf(model, tiny_tokenizer, tmp_path, "f16")
    back, _ = read_back(tmp_path)
    layer = model.model.layers[1].mlp.down_proj
    expected = dequantize_weight(layer, torch.float32).half().float()
    assert torch.equal(back.model.layers[1].mlp.down_proj.weight, expected)


def test_modelfile_uses_chatml_and_the_template_default_system(models, tmp_path):
    model, tokenizer = models["llama"]
    export_gguf(model, tokenizer, tmp_path, "q8_0")
    text = (tmp_path / MODELFILE_NAME).read_text()
    assert f"FROM ./{GGUF_FILE_NAME}" in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text
    smol = copy.deepcopy(tokenizer)
    smol.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}" + CHAT_TEMPLATE
    )
    template, system = ollama_template(smol)
    assert template.startswith("{{- range .Messages }}<|im_start|>") and system == "Be brief."
    smol.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert ollama_template(smol) == (None, None)  # Ollama then reads the template from the GGUF file
    config = model.config
    assert "derives it from the chat template stored in the GGUF" in ollama_modelfile(smol, config, "m.gguf")
    smol.chat_template = None  # a base model: nothing in the GGUF to derive a template from, and none claimed
    assert "the tokenizer has no chat template" in ollama_modelfile(smol, config, "m.gguf")


def test_refusals_are_one_line_and_write_nothing(models, tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=512))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' \(supported: llama, mistral, qwen2, qwen3\)"):
        export_gguf(gpt2, tiny_tokenizer, tmp_path / "gpt2")
    with pytest.raises(ValueError, match="GGUF dtype 'q4_0' is not supported; use one of bf16, f16, q8_0"):
        export_gguf(models["llama"][0], tiny_tokenizer, tmp_path / "q4", "q4_0")
    yarn = build_tiny_llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        export_gguf(yarn, tiny_tokenizer, tmp_path / "yarn")
    adapted = build_tiny_llama()
    inject_lora(adapted, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="is a LoRA layer; merge the adapters"):
        export_gguf(adapted, tiny_tokenizer, tmp_path / "lora")
    assert not any(tmp_path.iterdir())


def test_llama3_rope_factors_match_transformers_frequencies():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    config = tiny_llama_config(rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = config.hidden_size // config.num_attention_heads
    default = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    torch.testing.assert_close(llama3_rope_factors(config).double(), default / scaled.double(), rtol=1e-5, atol=0)
    names = [
        p.name
        for p in gguf_export._plan(
            build_tiny_llama(rope_parameters=rope), gguf_export.GGUF_ARCHITECTURES["llama"], "f16"
        )
    ]
    assert names[-1] == "rope_freqs.weight"


def test_a_failed_export_keeps_the_previous_one(models, tmp_path, monkeypatch):
    model, tokenizer = models["llama"]
    export_gguf(model, tokenizer, tmp_path / "out", "q8_0")
    (tmp_path / "out" / "README.md").write_text("mine")
    before = (tmp_path / "out" / GGUF_FILE_NAME).read_bytes()
    calls = []

    def failing(tensor, qtype):
        calls.append(qtype)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(tensor, qtype)

    real = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", failing)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(model, tokenizer, tmp_path / "out", "f16")
    assert (tmp_path / "out" / GGUF_FILE_NAME).read_bytes() == before
    assert (tmp_path / "out" / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
