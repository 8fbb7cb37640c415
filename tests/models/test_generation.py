"""Generation core: left-padded batches decode as single prompts do in plain transformers; stop strings; streaming."""

import pytest
import torch
from conftest import build_tiny_llama

from lightning_qlora.models.generation import (
    GenerationOptions,
    encode_prompts,
    generate,
)

PROMPTS = ["The quick brown fox", "Question: What is the capital of France? Answer:", "the cat"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama().eval()


@pytest.fixture(scope="module")
def greedy(model, tiny_tokenizer):
    batch = encode_prompts(tiny_tokenizer, PROMPTS, add_special_tokens=True)
    with torch.no_grad():
        return batch, generate(
            model, tiny_tokenizer, batch["input_ids"], batch["attention_mask"], GenerationOptions(12)
        )


def reference_ids(model, tokenizer, prompt, max_new_tokens):
    """Plain transformers: one unpadded prompt, greedy, cut at the end-of-sequence token."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def test_left_padded_batch_decodes_as_each_prompt_alone(model, tiny_tokenizer, greedy):
    batch, completions = greedy
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()  # padded on the left
    for prompt, completion in zip(PROMPTS, completions):
        expected = reference_ids(model, tiny_tokenizer, prompt, 12)
        assert completion.token_ids == expected
        assert completion.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
        assert completion.prompt_tokens == len(tiny_tokenizer(prompt)["input_ids"])
        assert completion.finish_reason == ("length" if len(expected) == 12 else "stop")


def test_stop_string_cuts_the_completion(model, tiny_tokenizer, greedy):
    batch, completions = greedy
    text = completions[0].text
    stop = text[4:6]
    assert stop.strip() and len(text) > 6
    options = GenerationOptions(12, stop=[stop])
    with torch.no_grad():
        cut = generate(model, tiny_tokenizer, batch["input_ids"], batch["attention_mask"], options)[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < 12


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(model, tiny_tokenizer, greedy):
    batch, _ = greedy
    options = GenerationOptions(8, temperature=1.5, top_p=0.95, seed=7)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        first = generate(model, tiny_tokenizer, batch["input_ids"], batch["attention_mask"], options)
        again = generate(model, tiny_tokenizer, batch["input_ids"], batch["attention_mask"], options)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_options_are_one_line(kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        GenerationOptions(**kwargs)
    assert "\n" not in str(err.value)


def test_right_padding_and_an_overlong_prompt_are_refused(model, tiny_tokenizer):
    ids = torch.tensor([[5, 6, 7], [5, 6, 3]])
    with pytest.raises(ValueError, match="left"):
        generate(model, tiny_tokenizer, ids, torch.tensor([[1, 1, 1], [1, 1, 0]]), GenerationOptions(2))
    long = torch.full((1, 256), 5)
    with pytest.raises(ValueError, match="prompt 0 of the batch is 256 tokens but the model's context window is 256"):
        generate(model, tiny_tokenizer, long, torch.ones_like(long), GenerationOptions(2))


def test_a_prompt_near_the_window_does_not_shorten_the_other_rows_answers(model, tiny_tokenizer):
    """Each row gets max_new_tokens or the window less its own prompt, whatever else is in its batch."""
    prompts = ["the cat", "fox " * 235, "Question: What is the capital of France? Answer:"]
    batch = encode_prompts(tiny_tokenizer, prompts, add_special_tokens=True)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert 256 - 30 < lengths[1] < 256 - 8  # the long row's budget is under max_new_tokens
    options = GenerationOptions(30)
    with torch.no_grad():
        together = generate(model, tiny_tokenizer, batch["input_ids"], batch["attention_mask"], options)
        for prompt, completion, length in zip(prompts, together, lengths):
            one = encode_prompts(tiny_tokenizer, [prompt], add_special_tokens=True)
            (alone,) = generate(model, tiny_tokenizer, one["input_ids"], one["attention_mask"], options)
            assert completion.token_ids == alone.token_ids and completion.finish_reason == alone.finish_reason
            assert len(completion.token_ids) <= min(30, 256 - length)
    assert len(together[0].token_ids) > 256 - lengths[1]  # more than the long row's room: its own budget
