"""Packed rows through real transformers models: per-row losses as unpacked, no attention across rows.

Also ``lightning_qlora.models.packed.check_packed_rows_stay_apart``: it passes models whose masks follow
``position_ids`` and names the ones whose masks do not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_qlora.data.packing import PackedCollator
from lightning_qlora.models.losses import causal_lm_loss
from lightning_qlora.models.packed import PackedAttentionError, check_packed_rows_stay_apart

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    attention_dropout=0.1,
)  # dropout acts only in train mode: the check's tests run there


def _model(arch: str) -> torch.nn.Module:
    import transformers as tf

    if arch == "llama":
        config = tf.LlamaConfig(**SMALL, num_key_value_heads=2)
    elif arch == "qwen3":
        config = tf.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16)
    elif arch == "gemma3":  # one sliding-window layer (window 8) and one global layer
        layers = ["sliding_attention", "full_attention"]
        config = tf.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=layers)
    elif arch == "opt":  # learned positions from the attention mask: packing cannot work
        config = tf.OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4)
    else:
        raise AssertionError(arch)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def _rows(lengths: list[int], seed: int = 1) -> list[dict]:
    """Rows of random tokens; the first third of each is an (untrained) prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(4, 512, (n,), generator=g).tolist()
        cut = n // 3
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "index": i})
    return rows


def _row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token losses (0 where ignored), shape (B, T-1)."""
    flat = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none", ignore_index=-100)
    return flat.view(labels.shape[0], -1)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_packed_rows_have_the_losses_and_logits_of_the_rows_alone(arch):
    model = _model(arch)
    rows = _rows([11, 17, 7, 20])  # two packs: rows 0+1 (28 tokens) and 2+3 (27 tokens), padded to 32
    batch = PackedCollator(pad_id=3, pad_to_multiple_of=8)([rows[:2], rows[2:]])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        losses = _row_losses(packed, batch["labels"])
        for b, pack in enumerate((rows[:2], rows[2:])):
            start = 0
            for row in pack:
                n = len(row["input_ids"])
                alone = model(input_ids=torch.tensor([row["input_ids"]])).logits
                assert torch.allclose(packed[b, start : start + n], alone[0], atol=1e-5), (arch, row["index"])
                want = _row_losses(alone, torch.tensor([row["labels"]]))[0]
                got = losses[b, start : start + n - 1]
                assert torch.allclose(got, want, atol=1e-5)
                # the last token of a row never learns to predict the next row's first token
                if start:
                    assert losses[b, start - 1] == 0 and batch["labels"][b, start] == -100
                start += n


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_changing_one_row_leaves_the_next_rows_logits_bit_unchanged(arch):
    model = _model(arch)
    rows = _rows([13, 9, 10])
    batch = PackedCollator(pad_id=3)([rows])
    changed = batch["input_ids"].clone()
    changed[0, :13] = torch.randint(4, 512, (13,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        b = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits
    assert not torch.equal(a[0, :13], b[0, :13])
    assert torch.equal(a[0, 13:], b[0, 13:])


def test_the_packed_batch_loss_is_the_mean_over_the_trained_tokens_of_the_unpacked_batch(tiny_tokenizer):
    from lightning_qlora.data.batching import InstructionCollator

    model = _model("llama")
    rows = _rows([11, 17, 7, 20])
    packed = PackedCollator(pad_id=3)([rows[:2], rows[2:]])
    padded = InstructionCollator(pad_id=3)(rows)
    with torch.no_grad():
        a = causal_lm_loss(model, packed["input_ids"], packed["labels"], None, 8, packed["position_ids"])
        b = causal_lm_loss(model, padded["input_ids"], padded["labels"], padded["attention_mask"], 8)
    assert (packed["labels"][:, 1:] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_check_passes_models_whose_masks_follow_position_ids(arch):
    model = _model(arch).train()  # dropout on: the check reseeds, so both passes draw the same masks
    ids = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    check_packed_rows_stay_apart(model, ids)
    assert torch.equal(torch.random.get_rng_state(), state)  # exact resume: the check draws nothing


def test_the_check_names_a_model_whose_packed_rows_attend_to_each_other():
    ids = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    message = r"OPTForCausalLM lets packed rows attend to each other.*packing=False"
    with pytest.raises(PackedAttentionError, match=message):
        check_packed_rows_stay_apart(_model("opt"), ids)
