"""Streaming: the pieces add up to the batch completion; a stop string split over pieces is held back."""

import pytest
import torch
from conftest import build_tiny_llama

from lightning_qlora.models.generation import GenerationOptions, encode_prompts, generate
from lightning_qlora.models.streaming import StopStringFilter, TextStream

PROMPTS = ["The quick brown fox", "Question: What is the capital of France? Answer:"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama().eval()


@pytest.fixture(scope="module")
def greedy(model, tiny_tokenizer):
    batch = encode_prompts(tiny_tokenizer, PROMPTS, add_special_tokens=True)
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return batch, generate(model, tiny_tokenizer, ids, mask, GenerationOptions(12))


def test_stream_pieces_add_up_to_the_completion(model, tiny_tokenizer, greedy):
    batch, completions = greedy
    one = encode_prompts(tiny_tokenizer, PROMPTS[1:2], add_special_tokens=True)
    stream = TextStream(model, tiny_tokenizer, one["input_ids"], one["attention_mask"], GenerationOptions(12))
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == completions[1].text
    assert stream.completion.token_ids == completions[1].token_ids


def test_stop_filter_holds_back_a_split_stop_string():
    stops = StopStringFilter(["###"])
    assert [stops.feed(p) for p in ["Paris", " is #", "#", "# more"]] == ["Paris", " is ", "", ""]
    assert stops.flush() == ""
    keep = StopStringFilter(["###"])
    assert keep.feed("a #") == "a " and keep.flush() == "#"
