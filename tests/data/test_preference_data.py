"""PreferenceDataModule: the public layouts, response-only labels, the over-long policy and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_qlora.data.loader import ResumableDataLoader
from lightning_qlora.data.preference import PreferenceDataModule, normalize_pair
from lightning_qlora.data.prompts import DataError

EOS = "<|im_end|>"
Q, GOOD, BAD = "What is the capital of France?", "Paris.", "the cat sat on the mat"
USER, GOOD_MSG, BAD_MSG = ({"role": "user", "content": Q}, {"role": "assistant", "content": GOOD},
                           {"role": "assistant", "content": BAD})  # fmt: skip
LAYOUTS = {
    "strings": {"prompt": Q, "chosen": GOOD, "rejected": BAD},
    "trl_conversational": {"prompt": [USER], "chosen": [GOOD_MSG], "rejected": [BAD_MSG]},
    "whole_conversations": {"chosen": [USER, GOOD_MSG], "rejected": [USER, BAD_MSG]},
    "ultrafeedback": {"prompt": Q, "chosen": [USER, GOOD_MSG], "rejected": [USER, BAD_MSG], "score_chosen": 9.0},
    "sharegpt_roles": {"chosen": [{"from": "human", "value": Q}, {"from": "gpt", "value": GOOD}],
                       "rejected": [{"from": "human", "value": Q}, {"from": "gpt", "value": BAD}]},
    "hh_rlhf_strings": {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {GOOD}",
                        "rejected": f"\n\nHuman: {Q}\n\nAssistant: {BAD}"},
}  # fmt: skip


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_dm(tokenizer, tmp_path: Path, rows, val_rows=None, **kwargs) -> PreferenceDataModule:
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows or [LAYOUTS["strings"]])
    dm = PreferenceDataModule(str(train), val_path=str(val), **kwargs).connect(tokenizer)
    dm.setup("fit")
    return dm


def scored(tokenizer, ids, labels) -> str:
    kept = [label for label in labels if label != -100]
    assert kept == [i for i, label in zip(ids, labels) if label != -100]  # labels are the tokens themselves
    return tokenizer.decode(kept)


def test_every_layout_gives_the_same_tokens_and_response_only_labels(tiny_tokenizer, tmp_path):
    dm = make_dm(tiny_tokenizer, tmp_path, list(LAYOUTS.values()))
    examples = dm.train_dataset
    assert len(examples) == len(LAYOUTS)
    for name, example in zip(LAYOUTS, examples):
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert example[key] == examples[0][key], (name, key)
    example = examples[0]
    text = tiny_tokenizer.decode(example["chosen_input_ids"])
    assert text == f"<|im_start|>user\n{Q}{EOS}\n<|im_start|>assistant\n{GOOD}{EOS}\n"
    assert scored(tiny_tokenizer, example["chosen_input_ids"], example["chosen_labels"]) == f"{GOOD}{EOS}"
    assert scored(tiny_tokenizer, example["rejected_input_ids"], example["rejected_labels"]) == f"{BAD}{EOS}"
    assert example["chosen_labels"][-1] == -100  # the newline after the end-of-turn token is not scored
    assert dm.stats()["train_pairs"] == len(LAYOUTS) and dm.stats()["prefix_mismatch"] == 0


def test_multi_turn_prompt_scores_only_the_final_answer_and_system_prompt_is_added(tiny_tokenizer, tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, USER]
    row = {"prompt": turns, "chosen": GOOD, "rejected": BAD}
    dm = make_dm(tiny_tokenizer, tmp_path, [row], system_prompt="Be terse.")
    example = dm.train_dataset[0]
    assert tiny_tokenizer.decode(example["chosen_input_ids"]).startswith("<|im_start|>system\nBe terse.")
    assert scored(tiny_tokenizer, example["chosen_input_ids"], example["chosen_labels"]) == f"{GOOD}{EOS}"


def test_batches_hold_chosen_then_rejected_with_row_index_and_resume(tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}." * (i + 1), "rejected": "no"} for i in range(6)]
    dm = make_dm(tiny_tokenizer, tmp_path, rows, batch_size=3)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 6 and batch["row_index"].shape == (3,)
    for k, index in enumerate(batch["row_index"].tolist()):
        example = dm.train_dataset[index]
        for side, row in (("chosen", k), ("rejected", k + 3)):
            n = len(example[f"{side}_input_ids"])
            assert batch["input_ids"][row, :n].tolist() == example[f"{side}_input_ids"]
            assert batch["labels"][row, :n].tolist() == example[f"{side}_labels"]
            assert int(batch["attention_mask"][row].sum()) == n and bool((batch["labels"][row, n:] == -100).all())
    assert dm.describe_rows([0, 5]) == [f"{tmp_path / 'train.jsonl'} line 1", f"{tmp_path / 'train.jsonl'} line 6"]
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[0] == 2


def test_other_answer_pairs_are_deterministic_within_each_split(tiny_tokenizer, tmp_path):
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(8)]
    path = write_jsonl(tmp_path / "faq.jsonl", rows)
    dms = [PreferenceDataModule(str(path), rejected_from="other_answer", val_split=3).connect(tiny_tokenizer)
           for _ in range(2)]  # fmt: skip
    for dm in dms:
        dm.setup("fit")
    first, second = dms
    assert [e["rejected_input_ids"] for e in first.train_dataset] == [
        e["rejected_input_ids"] for e in second.train_dataset
    ]
    for split in (first.train_dataset, first.val_dataset):
        answers = {scored(tiny_tokenizer, e["chosen_input_ids"], e["chosen_labels"]) for e in split}
        for example in split:
            chosen = scored(tiny_tokenizer, example["chosen_input_ids"], example["chosen_labels"])
            rejected = scored(tiny_tokenizer, example["rejected_input_ids"], example["rejected_labels"])
            line = int(example["where"].rsplit(" ", 1)[1])
            assert chosen == f"Answer {line - 1}.{EOS}" and rejected != chosen and rejected in answers
    assert (first.stats()["train_pairs"], first.stats()["val_pairs"]) == (5, 3)


def _prompt_tokens(example, side: str) -> int:
    return next(i for i, label in enumerate(example[f"{side}_labels"]) if label != -100)


def test_over_long_pairs_truncate_prompt_from_the_left_then_responses(tiny_tokenizer, tmp_path):
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    row = {"prompt": long_prompt, "chosen": "Paris. " * 12, "rejected": "no"}
    full = make_dm(tiny_tokenizer, tmp_path, [row], [row], max_length=512).train_dataset[0]
    prompt, chosen = _prompt_tokens(full, "chosen"), len(full["chosen_input_ids"]) - _prompt_tokens(full, "chosen")
    assert prompt > 40 and chosen > 20

    # the prompt alone is cut, from the left, just enough for the longer response
    limit = prompt + chosen - 15
    dm = make_dm(tiny_tokenizer, tmp_path, [row], [row], max_length=limit, max_prompt_length=10)
    example = dm.train_dataset[0]
    assert dm.stats()["truncated_prompt"] == 2 and dm.stats()["truncated_response"] == 0  # train and val
    assert example["chosen_input_ids"] == full["chosen_input_ids"][15:] and len(example["chosen_input_ids"]) == limit
    assert example["chosen_labels"] == full["chosen_labels"][15:]
    assert example["rejected_input_ids"] == full["rejected_input_ids"][15:]  # both sides lose the same prompt tokens

    # the prompt keeps max_prompt_length tokens (its end), then the responses are cut at the right
    dm = make_dm(tiny_tokenizer, tmp_path, [row], [row], max_length=30, max_prompt_length=12)
    example = dm.train_dataset[0]
    assert dm.stats()["truncated_prompt"] == 2 and dm.stats()["truncated_response"] == 2
    assert example["chosen_input_ids"] == full["chosen_input_ids"][prompt - 12 : prompt + 18]
    assert _prompt_tokens(example, "chosen") == 12 and _prompt_tokens(example, "rejected") == 12
    assert example["rejected_input_ids"] == full["rejected_input_ids"][prompt - 12 :]  # short: not cut further
    assert scored(tiny_tokenizer, example["chosen_input_ids"], example["chosen_labels"]).startswith("Paris. Paris.")


def test_over_long_pairs_skip_with_a_count_or_stop_with_the_line(tiny_tokenizer, tmp_path):
    short, long = LAYOUTS["strings"], {"prompt": "Say it.", "chosen": "the cat sat on the mat " * 20, "rejected": "no"}
    with pytest.warns(UserWarning, match="skipped 1 pairs longer than max_length=40"):
        dm = make_dm(tiny_tokenizer, tmp_path, [short, long], max_length=40, on_long_row="skip")
    assert dm.stats()["skipped_long"] == 1 and dm.stats()["train_pairs"] == 1
    with pytest.raises(DataError) as err:
        make_dm(tiny_tokenizer, tmp_path, [short, long], max_length=40, on_long_row="error")
    assert "train.jsonl line 2: a sequence of this pair is" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"prompt": Q, "chosen": GOOD}, "line 2: missing required key 'rejected'"),
        ({"instruction": Q, "output": GOOD}, "looks like an instruction row: use rejected_from=other_answer"),
        ({"chosen": GOOD, "rejected": BAD}, "line 2: 'chosen' is a plain string but the row has no 'prompt'"),
        ({"prompt": Q, "chosen": 3, "rejected": BAD}, "'chosen' must be a string or a list of messages, got int"),
        ({"chosen": [USER, GOOD_MSG], "rejected": [{"role": "user", "content": "Other?"}, BAD_MSG]},
         "differ before their last assistant turn"),
        ({"chosen": [USER], "rejected": [USER, BAD_MSG]}, "line 2 chosen: no assistant turn"),
        ({"chosen": [USER, {"role": "assistant"}], "rejected": [USER, BAD_MSG]}, "string 'role' and 'content'"),
        ({"chosen": [GOOD_MSG], "rejected": [BAD_MSG]}, "'chosen' has no prompt before its assistant turn"),
        ([Q, GOOD, BAD], "line 2: expected a JSON object, got list"),
    ],
)  # fmt: skip
def test_bad_rows_are_one_line_errors_with_the_line(tiny_tokenizer, tmp_path, row, fragment):
    with pytest.raises(DataError) as err:
        make_dm(tiny_tokenizer, tmp_path, [LAYOUTS["strings"], row])
    assert fragment in str(err.value) and "\n" not in str(err.value) and "train.jsonl line 2" in str(err.value)


def test_bad_files_and_options_are_one_line_errors(tiny_tokenizer, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(LAYOUTS["strings"]) + "\n{not json\n")
    cases = [
        (lambda: PreferenceDataModule(str(bad_json)).prepare_data(), "bad.jsonl line 2: invalid JSON"),
        (lambda: PreferenceDataModule("x.jsonl", on_long_row="cut"), "unknown on_long_row 'cut'"),
        (lambda: PreferenceDataModule("x.jsonl", format="alpaca"), "applies with rejected_from=other_answer"),
        (lambda: PreferenceDataModule("x.jsonl", max_length=64, max_prompt_length=64), "max_prompt_length must be"),
    ]
    one = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "Q?", "output": "A."}] * 3)
    same = [{"instruction": "Q?", "output": "A."}] * 3
    cases.append((lambda: make_dm(tiny_tokenizer, tmp_path, same, same, rejected_from="other_answer"),
                  "every row has the same answer"))  # fmt: skip
    cases.append((lambda: PreferenceDataModule(str(one), rejected_from="other_answer", val_split=2)
                  .connect(tiny_tokenizer).setup(), "needs at least 2 rows per split, got 1"))  # fmt: skip
    for build, fragment in cases:
        with pytest.raises(DataError) as err:
            build()
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_normalize_pair_returns_prompt_and_responses():
    prompt, chosen, rejected = normalize_pair(LAYOUTS["hh_rlhf_strings"], "row 1")
    assert (prompt, chosen, rejected) == ([{"role": "user", "content": Q}], GOOD, BAD)
