"""Streaming: the pieces add up to the batch completion; a stop string split over pieces is held back."""

import pytest
import torch
from conftest import build_tiny_llama

from lightning_qlora.models.generation import GenerationOptions, encode_prompts, generate
from lightning_qlora.models.streaming import StopStringFilter, TextStream

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stream_pieces_add_up_to_the_batch_completion(tiny_tokenizer):
    """Streamed alone, the pieces add up to the completion the same prompt gets in a batch beside a shorter one."""
    model = build_tiny_llama().eval()
    prompts = ["The quick brown fox", "Question: What is the capital of France? Answer:"]
    batch = encode_prompts(tiny_tokenizer, prompts, add_special_tokens=True)
    one = encode_prompts(tiny_tokenizer, prompts[1:], add_special_tokens=True)
    with torch.no_grad():
        whole = generate(model, tiny_tokenizer, batch["input_ids"], batch["attention_mask"], GenerationOptions(12))[1]
    stream = TextStream(model, tiny_tokenizer, one["input_ids"], one["attention_mask"], GenerationOptions(12))
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    assert stream.completion.token_ids == whole.token_ids


def test_stop_filter_holds_back_a_split_stop_string():
    stops = StopStringFilter(["###"])
    assert [stops.feed(p) for p in ["Paris", " is #", "#", "# more"]] == ["Paris", " is ", "", ""]
    assert stops.flush() == ""
    keep = StopStringFilter(["###"])
    assert keep.feed("a #") == "a " and keep.flush() == "#"
