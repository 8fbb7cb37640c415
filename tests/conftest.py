"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny Llama models built offline (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France? Answer: Paris.",
    "Instruction: add two numbers. Input: 2 and 3. Response: 5.",
    "Low-rank adapters train a few parameters while the backbone stays frozen in four bits.",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z 0 1 2 3 4 5 6 7 8 9",
    "the cat sat on the mat; the dog sat on the log; birds fly south in winter.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(path: Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on a tiny corpus and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_llama_config(vocab_size: int = 512, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=3,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    # random init is small; widen weights a bit so 4-bit rounding and LoRA effects are visible in tests
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def load_with_hf_bitsandbytes(path):
    """The anchor's loading path: transformers + ``BitsAndBytesConfig`` NF4 + double quant, bf16, on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map={"": "cpu"}, quantization_config=quant
    )


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A saved tiny Llama (safetensors) with its tokenizer, like a local hub snapshot."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    model = build_tiny_llama()
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture()
def tiny_llama():
    return build_tiny_llama()


class TinyMLP(torch.nn.Module):
    """A plain MLP with a head named `output`; hidden sizes are multiples of 64."""

    def __init__(self, d_in: int = 64, d_hidden: int = 128, d_out: int = 64):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(d_hidden, d_hidden)
        self.output = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.output(self.act(self.fc2(self.act(self.fc1(x)))))


@pytest.fixture()
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP()


class NoLinear(torch.nn.Module):
    """A model with no linear layer at all (bad input for the plugin and the callback)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 64)
        self.norm = torch.nn.LayerNorm(64)


@pytest.fixture(scope="module")
def base():
    """A tiny Llama in eval mode, shared by a test module."""
    return build_tiny_llama().eval()


@pytest.fixture(scope="module")
def ids():
    """A fixed batch of token ids for the tiny models."""
    return torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", autouse=True)
def _isolated_datasets_cache(tmp_path_factory):
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(autouse=True)
def _skip_env_report(monkeypatch):
    """lm-eval's `add_env_info` shells out to `pip list` on every run (~1-2 s); not what these tests check."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
