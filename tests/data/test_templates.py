"""Response-only labels for every chat-template family people train with (lightning_qlora.data.templates/prompts).

Each family is a tiny tokenizer fixture carrying the family's real chat template (tests/data/templates/) and its
special tokens; the trained tokens of single- and multi-turn rows must be exactly the assistant turns plus each
turn's end-of-turn token (and EOS where the template ends with it), with pad = eos never masked as padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_qlora.data.datamodule import InstructionDataModule
from lightning_qlora.data.prompts import IGNORE_INDEX, DataError, PromptEncoder

TEMPLATES = Path(__file__).parent / "templates"
USER1, ANSWER1 = "What is the capital of France?", "Paris."
USER2, ANSWER2 = "And the dog?", "The dog sat on the log."
SINGLE = [{"role": "user", "content": USER1}, {"role": "assistant", "content": ANSWER1}]
MULTI = [*SINGLE, {"role": "user", "content": USER2}, {"role": "assistant", "content": ANSWER2}]

# family -> template file, special tokens (bos, eos, pad; None = unset), other specials, trained text per turn
# ("{}" is the answer; the last turn may add what the template closes the conversation with)
FAMILIES = {
    "llama3": ("llama3", ("<|begin_of_text|>", "<|eot_id|>", None), ["<|start_header_id|>", "<|end_header_id|>"],
               "{}<|eot_id|>", "{}<|eot_id|>"),
    "chatml-qwen2.5": ("qwen2_5", (None, "<|im_end|>", "<|endoftext|>"), ["<|im_start|>"],
                       "{}<|im_end|>", "{}<|im_end|>"),
    "chatml-smollm2": ("smollm2", ("<|im_start|>", "<|im_end|>", "<|im_end|>"), [], "{}<|im_end|>", "{}<|im_end|>"),
    "gemma": ("gemma", ("<bos>", "<eos>", "<pad>"), ["<start_of_turn>", "<end_of_turn>"],
              "{}<end_of_turn>", "{}<end_of_turn>"),
    "mistral": ("mistral", ("<s>", "</s>", None), [], "{}</s>", "{}</s>"),
    "llama2": ("llama2", ("<s>", "</s>", None), [], " {} </s>", " {} </s>"),
    "phi3": ("phi3", ("<s>", "<|endoftext|>", "<|endoftext|>"), ["<|user|>", "<|assistant|>", "<|end|>"],
             "{}<|end|>", "{}<|end|>\n<|endoftext|>"),
    "chatml-qwen3": ("qwen3", (None, "<|im_end|>", "<|endoftext|>"), ["<|im_start|>", "<think>", "</think>"],
                     "{}<|im_end|>", "<think>\n\n</think>\n\n{}<|im_end|>"),  # the think block on the last turn only
    "gemma3": ("gemma3", ("<bos>", "<eos>", "<pad>"), ["<start_of_turn>", "<end_of_turn>"],
               "{}<end_of_turn>", "{}<end_of_turn>"),
    "llama3.1": ("llama3_1", ("<|begin_of_text|>", "<|eot_id|>", None), ["<|start_header_id|>", "<|end_header_id|>"],
                 "{}<|eot_id|>", "{}<|eot_id|>"),
    "generation-qwen2.5": ("qwen2_5_training", (None, "<|im_end|>", "<|endoftext|>"), ["<|im_start|>"],
                           "{}<|im_end|>", "{}<|im_end|>"),
    "generation-phi3": ("phi3_training", ("<s>", "<|endoftext|>", "<|endoftext|>"),
                        ["<|user|>", "<|assistant|>", "<|end|>"], "{}<|end|>", "{}<|end|>\n<|endoftext|>"),
}  # fmt: skip


def family_tokenizer(tokenizer_dir: Path, template: str, tokens: tuple, specials: list[str]):
    """The shared tiny BPE tokenizer given a family's chat template and special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos, eos, pad = tokens
    tok.add_tokens([t for t in (*specials, bos, eos, pad) if t], special_tokens=True)
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
    tok.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    return tok


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizer_dir):
    return {name: family_tokenizer(tiny_tokenizer_dir, *spec[:3]) for name, spec in FAMILIES.items()}


def trained(tokenizer, ids, labels) -> list[str]:
    """The decoded runs of labelled tokens (each label must be its input token)."""
    runs, run = [], []
    for token, label in zip([*ids, None], [*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_are_the_assistant_turns_and_their_end_of_turn(tokenizers, family):
    tok = tokenizers[family]
    middle, last = FAMILIES[family][3:]
    single, multi = PromptEncoder(tok).encode_many([SINGLE, MULTI], ["single", "multi"])
    assert trained(tok, single.input_ids, single.labels) == [last.format(ANSWER1)]
    assert trained(tok, multi.input_ids, multi.labels) == [middle.format(ANSWER1), last.format(ANSWER2)]
    for enc, messages in ((single, SINGLE), (multi, MULTI)):
        text = tok.apply_chat_template(messages, tokenize=False)
        assert enc.input_ids == tok(text, add_special_tokens=False)["input_ids"]  # the template's own text
        prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        assert enc.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert not enc.prefix_mismatch
        untrained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])
        assert USER1 in untrained and (USER2 in untrained) == (enc is multi)


def test_generation_markers_and_prefixes_give_the_same_labels(tokenizers):
    for marked, plain in (("generation-qwen2.5", "chatml-qwen2.5"), ("generation-phi3", "phi3")):
        a = PromptEncoder(tokenizers[marked]).encode_many([SINGLE, MULTI], ["s", "m"])
        b = PromptEncoder(tokenizers[plain]).encode_many([SINGLE, MULTI], ["s", "m"])
        assert [(e.input_ids, e.labels, e.prompt_tokens) for e in a] == [
            (e.input_ids, e.labels, e.prompt_tokens) for e in b
        ]


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("family", ["chatml-smollm2", "phi3", "llama3"])
@pytest.mark.parametrize("packing", [False, True])
def test_pad_equal_to_eos_is_never_masked_as_padding(tiny_tokenizer_dir, family, packing, tmp_path):
    """SmolLM2 (pad = eos = end of turn), Phi-3 (pad = eos, which closes the conversation) and Llama-3 (no pad token:
    pad = eos, as CausalLM sets it)."""
    template, tokens, specials, middle, last = FAMILIES[family]
    tok = family_tokenizer(tiny_tokenizer_dir, template, tokens, specials)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    rows = [SINGLE, MULTI, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    train, val = _write(tmp_path / "t.jsonl", rows), _write(tmp_path / "v.jsonl", rows[:1])
    dm = InstructionDataModule(
        train, val_path=val, batch_size=3, packing=packing, max_length=512, pad_to_multiple_of=64
    )
    dm.connect(tok)
    batch = next(iter(dm.train_dataloader()))
    labels, ids = batch["labels"], batch["input_ids"]
    turns = [sum(m["role"] == "assistant" for m in r) for r in rows]
    want = sum((n - 1) * middle.count(tok.eos_token) + last.count(tok.eos_token) for n in turns)
    assert int((labels == eos).sum()) == want > 0  # every eos the rows' answers end with is trained
    if not packing:
        padding = batch["attention_mask"] == 0
        assert padding.any() and (ids[padding] == eos).all() and (labels[padding] == IGNORE_INDEX).all()
    else:  # one pack of whole rows; the padding after them is not trained
        end = int(batch["num_tokens"])
        assert ids.shape[0] == 1 and end == sum(len(e["input_ids"]) for e in dm.train_dataset) < ids.shape[1]
        assert (labels[0, end:] == IGNORE_INDEX).all() and (ids[0, end:] == eos).all()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        # DeepSeek-R1: the prompt opens the answer with "<think>\n", the rendered turn drops it
        ((TEMPLATES / "deepseek_r1_distill.jinja").read_text(), "cannot be split into prompt and response"),
        # the generation prompt names another role than the rendered turns
        ("{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
         "cannot be split into prompt and response"),
        # assistant turns are never rendered: nothing to train on
        ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% endif %}{% endfor %}",
         "renders no response tokens for assistant turn 1"),
        # markers that wrap nothing
        ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if false %}{% generation %}x{% endgeneration %}"
         "{% endif %}", "blocks mark no tokens"),
        ("{{ raise_exception('Conversation roles must alternate') }}", "the chat template failed"),
    ],
    ids=["deepseek-r1", "other-role", "no-assistant", "empty-markers", "raises"],
)  # fmt: skip
def test_a_template_that_cannot_be_split_is_one_line_error(tiny_tokenizer_dir, template, message):
    tok = family_tokenizer(tiny_tokenizer_dir, "smollm2", ("<|im_start|>", "<|im_end|>", "<|im_end|>"), [])
    tok.chat_template = template
    with pytest.raises(DataError, match=message) as err:
        PromptEncoder(tok).encode_many([SINGLE], ["data.jsonl line 3"])
    assert str(err.value).startswith("data.jsonl line 3: ") and "\n" not in str(err.value)
