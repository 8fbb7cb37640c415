"""Tests for lightning_qlora.data.datamodule (InstructionDataModule) and lightning_qlora.data.prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler

from lightning_qlora.data.datamodule import DataError, InstructionCollator, InstructionDataModule, LengthGroupedSampler
from lightning_qlora.data.prompts import ALPACA_PREAMBLE, ALPACA_PROMPT, ALPACA_PROMPT_INPUT

EOS = "<|im_end|>"
SHORT = {"instruction": "Say hi.", "output": "hi"}
FRANCE = {"instruction": "What is the capital of France?", "input": "", "output": "Paris."}
ADD = {"instruction": "Add two numbers.", "input": "2 and 3", "output": "The answer is 5."}
CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "The dog sat on the log."},
        {"role": "user", "content": "trailing user turn is dropped"},
    ]
}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_dm(tokenizer, tmp_path: Path, rows, val_rows=(SHORT,), **kwargs) -> InstructionDataModule:
    """Rows go to train.jsonl in order; validation comes from a separate file."""
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    dm = InstructionDataModule(str(train), val_path=str(val), **kwargs).connect(tokenizer)
    dm.setup("fit")
    return dm


def spans(example) -> list[tuple[int, int]]:
    """Contiguous runs of trained (label != -100) positions."""
    out, start = [], None
    for i, label in enumerate([*example["labels"], -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            out.append((start, i))
            start = None
    return out


def trained_texts(tokenizer, example) -> list[str]:
    for s, e in spans(example):
        assert example["labels"][s:e] == example["input_ids"][s:e]
    return [tokenizer.decode(example["input_ids"][s:e]) for s, e in spans(example)]


def chat_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- prompts and masking


def test_alpaca_rows_with_chat_template(tiny_tokenizer, tmp_path):
    dm = make_dm(tiny_tokenizer, tmp_path, [FRANCE, ADD])
    france, add = dm.train_dataset
    msgs = [{"role": "user", "content": FRANCE["instruction"]}, {"role": "assistant", "content": "Paris."}]
    assert france["input_ids"] == chat_ids(tiny_tokenizer, msgs)
    prompt = chat_ids(tiny_tokenizer, msgs[:1], add_generation_prompt=True)
    assert france["input_ids"][: len(prompt)] == prompt
    assert set(france["labels"][: len(prompt)]) == {-100}
    assert spans(france)[0][0] == len(prompt)
    assert trained_texts(tiny_tokenizer, france) == ["Paris." + EOS]
    # instruction + "\n\n" + input becomes the user message
    assert tiny_tokenizer.decode(add["input_ids"]).startswith("<|im_start|>user\nAdd two numbers.\n\n2 and 3<|im_end|>")
    assert trained_texts(tiny_tokenizer, add) == ["The answer is 5." + EOS]


def test_alpaca_prompt_style(tiny_tokenizer, tmp_path):
    dm = make_dm(tiny_tokenizer, tmp_path, [FRANCE, ADD], prompt_style="alpaca")
    france, add = dm.train_dataset
    assert tiny_tokenizer.decode(france["input_ids"]) == ALPACA_PROMPT.format(instruction=FRANCE["instruction"]) + (
        "Paris." + EOS
    )
    expected = ALPACA_PROMPT_INPUT.format(instruction="Add two numbers.", input="2 and 3") + "The answer is 5." + EOS
    assert tiny_tokenizer.decode(add["input_ids"]) == expected
    assert trained_texts(tiny_tokenizer, france) == ["Paris." + EOS]
    assert trained_texts(tiny_tokenizer, add) == ["The answer is 5." + EOS]
    prompt_len = len(tiny_tokenizer(ALPACA_PROMPT_INPUT.format(instruction="Add two numbers.", input="2 and 3"))[0])
    assert set(add["labels"][:prompt_len]) == {-100} and add["labels"][prompt_len] != -100


def test_multi_turn_chat_trains_every_assistant_turn(tiny_tokenizer, tmp_path):
    dm = make_dm(tiny_tokenizer, tmp_path, [CHAT])
    (ex,) = dm.train_dataset
    assert ex["input_ids"] == chat_ids(tiny_tokenizer, CHAT["messages"][:5])  # trailing user turn dropped
    assert trained_texts(tiny_tokenizer, ex) == ["Paris." + EOS, "The dog sat on the log." + EOS]
    untrained = tiny_tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == -100])
    assert untrained == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nAnd the dog?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_multi_turn_chat_alpaca_style_and_sharegpt_keys(tiny_tokenizer, tmp_path):
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Say hi."},
            {"from": "gpt", "value": "hi"},
            {"from": "human", "value": "Again."},
            {"from": "gpt", "value": "hi again"},
        ]
    }
    dm = make_dm(tiny_tokenizer, tmp_path, [CHAT, sharegpt], prompt_style="alpaca")
    chat, share = dm.train_dataset
    text = tiny_tokenizer.decode(chat["input_ids"])
    assert text.startswith("You are terse.\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\n")
    assert trained_texts(tiny_tokenizer, chat) == ["Paris." + EOS, "The dog sat on the log." + EOS]
    assert trained_texts(tiny_tokenizer, share) == ["hi" + EOS, "hi again" + EOS]
    assert tiny_tokenizer.decode(share["input_ids"]).startswith(ALPACA_PREAMBLE)


def test_system_prompt_and_train_on_all(tiny_tokenizer, tmp_path):
    dm = make_dm(tiny_tokenizer, tmp_path, [FRANCE], system_prompt="Be brief.", train_on_responses_only=False)
    (ex,) = dm.train_dataset
    assert tiny_tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert ex["labels"] == ex["input_ids"]
    assert dm.stats()["train_trained_tokens"] == dm.stats()["train_tokens"] == len(ex["input_ids"])


def test_chat_template_missing_falls_back_to_alpaca(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        dm = make_dm(tokenizer, tmp_path, [FRANCE])
    assert tokenizer.decode(dm.train_dataset[0]["input_ids"]).startswith(ALPACA_PREAMBLE)


def test_template_prefix_mismatch_warns(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # the generation prompt ends with a space that the answer's first token absorbs (" Paris"): its text is the start
    # of the conversation but its tokens are not (a prompt whose text is not: tests/data/test_templates.py)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
    )
    with pytest.warns(UserWarning, match="2 rows: a rendered prompt prefix is not a token prefix"):
        dm = make_dm(tokenizer, tmp_path, [FRANCE], val_rows=[FRANCE])
    assert dm.stats()["prefix_mismatch"] == 2
    (trained,) = trained_texts(tokenizer, dm.train_dataset[0])
    assert trained.endswith("Paris." + EOS) and "France" not in trained


def test_truncation_and_stats(tiny_tokenizer, tmp_path):
    full = make_dm(tiny_tokenizer, tmp_path, [ADD]).train_dataset[0]
    prompt_len = spans(full)[0][0]
    dm = make_dm(tiny_tokenizer, tmp_path, [ADD], max_length=prompt_len + 2)
    (ex,) = dm.train_dataset
    assert ex["input_ids"] == full["input_ids"][: prompt_len + 2]
    assert ex["labels"] == full["labels"][: prompt_len + 2]
    stats = dm.stats()
    assert stats["truncated"] == 1 and stats["train_rows"] == 1 and stats["val_rows"] == 1
    assert stats["train_tokens"] == prompt_len + 2 and stats["train_trained_tokens"] == 2


def test_long_prompt_error_and_skip(tiny_tokenizer, tmp_path):
    long = {"instruction": "the cat sat on the mat " * 20, "output": "ok"}
    rows = [FRANCE, ADD, long, FRANCE]
    with pytest.raises(DataError) as err:
        make_dm(tiny_tokenizer, tmp_path, rows, max_length=48)
    prompt = len(chat_ids(tiny_tokenizer, [{"role": "user", "content": long["instruction"]}], True))
    assert str(err.value) == (
        f"{tmp_path / 'train.jsonl'} line 3: prompt is {prompt} tokens but max_length is 48; "
        "raise max_length or set on_long_prompt=skip"
    )
    with pytest.warns(UserWarning, match=r"skipped 1 rows .*train.jsonl line 3"):
        dm = make_dm(tiny_tokenizer, tmp_path, rows, max_length=48, on_long_prompt="skip")
    assert dm.stats()["skipped_long_prompt"] == 1 and len(dm.train_dataset) == 3
    with pytest.warns(UserWarning, match="skipped 1 rows"), pytest.raises(DataError, match="no train rows left"):
        make_dm(tiny_tokenizer, tmp_path, [long], max_length=48, on_long_prompt="skip")


# ---------------------------------------------------------------- splits


def numbered(n: int) -> list[dict]:
    return [{"instruction": f"Question {i}", "output": f"Answer {i}"} for i in range(n)]


def answers(tokenizer, dataset) -> set[str]:
    return {trained_texts(tokenizer, ex)[0].removesuffix(EOS) for ex in dataset}


@pytest.mark.parametrize(("val_split", "n_val"), [(0.2, 4), (0.01, 1), (3, 3), (3.0, 3)])
def test_val_split_sizes_and_determinism(tiny_tokenizer, tmp_path, val_split, n_val):
    path = write_jsonl(tmp_path / "rows.jsonl", numbered(20))

    def split(seed):
        dm = InstructionDataModule(str(path), val_split=val_split, seed=seed).connect(tiny_tokenizer)
        dm.setup()
        return answers(tiny_tokenizer, dm.train_dataset), answers(tiny_tokenizer, dm.val_dataset)

    train, val = split(42)
    assert len(val) == n_val and len(train) == 20 - n_val
    assert train | val == {f"Answer {i}" for i in range(20)}
    assert split(42) == (train, val)
    if n_val > 1:
        assert split(7)[1] != val


def test_val_split_errors(tiny_tokenizer, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [FRANCE])
    with pytest.raises(DataError, match=r"one.jsonl: 1 rows cannot give 1 validation rows .* pass val_path"):
        InstructionDataModule(str(one)).prepare_data()
    five = write_jsonl(tmp_path / "five.jsonl", numbered(5))
    with pytest.raises(DataError, match="5 rows cannot give 5 validation rows"):
        InstructionDataModule(str(five), val_split=5).prepare_data()
    for bad in (0, -0.1, 1.5):
        with pytest.raises(DataError, match="val_split must be"):
            InstructionDataModule(str(five), val_split=bad)
    dm = InstructionDataModule(str(one), val_path=str(one)).connect(tiny_tokenizer)  # val_path: no split needed
    dm.setup()
    assert dm.stats()["train_rows"] == dm.stats()["val_rows"] == 1


# ---------------------------------------------------------------- sampler and collate


def test_length_grouped_sampler():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1003)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(1003)) and len(sampler) == 1003
    assert list(sampler) == first
    assert list(LengthGroupedSampler(lengths, batch_size=4, seed=1)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(1003)) and second != first
    assert max(lengths[i] for i in first[:4]) == max(lengths)  # longest batch first
    # mega-batches of 200 are sorted longest first (apart from the swapped-in longest element)
    for start in range(0, 1003, 200):
        chunk = [lengths[i] for i in first[start + 1 : start + 200]]
        assert chunk == sorted(chunk, reverse=True)

    def spread(order):
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    shuffled = list(range(1003))
    random.Random(1).shuffle(shuffled)
    assert spread(first) * 10 < spread(shuffled)


def test_collator_padding():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9, 10, 11, 12], "labels": [8] * 5}]
    batch = InstructionCollator(pad_id=3)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3, 3], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [8] * 5]
    assert all(t.dtype == torch.long for t in batch.values())
    padded = InstructionCollator(pad_id=3, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape == (2, 8) and padded["labels"][:, 5:].eq(-100).all()


def test_dataloaders(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    rows = numbered(30) + [ADD, FRANCE]
    dm = make_dm(tiny_tokenizer, tmp_path, rows, val_rows=rows[:6], batch_size=4, pad_to_multiple_of=8)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    seen = 0
    for batch in loader:
        n, width = batch["input_ids"].shape
        assert width % 8 == 0 and batch["labels"].shape == batch["attention_mask"].shape == (n, width)
        pads = batch["attention_mask"] == 0
        assert batch["input_ids"][pads].eq(tiny_tokenizer.pad_token_id).all() and batch["labels"][pads].eq(-100).all()
        seen += n
    assert seen == 32
    assert [b["input_ids"].shape[0] for b in dm.val_dataloader()] == [4, 2]
    first_val = next(iter(dm.val_dataloader()))["input_ids"][0]
    assert first_val[: len(dm.val_dataset[0]["input_ids"])].tolist() == dm.val_dataset[0]["input_ids"]

    no_pad = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    no_pad.pad_token = None
    dm = make_dm(no_pad, tmp_path, [FRANCE, ADD], group_by_length=False, batch_size=2)
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"][batch["attention_mask"] == 0].eq(no_pad.eos_token_id).all()


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_trainer_iterates_train_dataloader(tiny_tokenizer, tmp_path):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.tokenizer = tiny_tokenizer
            self.emb = torch.nn.Embedding(len(tiny_tokenizer), 8)
            self.head = torch.nn.Linear(8, len(tiny_tokenizer))
            self.shapes: list[tuple[int, int]] = []

        def training_step(self, batch, batch_idx):
            assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
            self.shapes.append(tuple(batch["input_ids"].shape))
            logits = self.head(self.emb(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    path = write_jsonl(tmp_path / "rows.jsonl", numbered(12))
    dm = InstructionDataModule(str(path), val_split=2, batch_size=4)  # tokenizer comes from the LightningModule
    model = Tiny()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.tokenizer is tiny_tokenizer
    assert [s[0] for s in model.shapes] == [4, 4, 2] * 2
    assert trainer.train_dataloader.sampler.epoch == 1


# ---------------------------------------------------------------- sources


def test_pkg_resource_path(tiny_tokenizer):
    dm = InstructionDataModule("pkg://zaragoza_construction_faq/data/faq-en-alpaca.jsonl", max_length=256)
    dm.connect(tiny_tokenizer).setup()
    stats = dm.stats()
    assert stats["train_rows"] + stats["val_rows"] == 503 and stats["val_rows"] == 25
    assert stats["skipped_long_prompt"] == 0 and 0 < stats["train_trained_tokens"] < stats["train_tokens"]
    assert all(trained_texts(tiny_tokenizer, ex) for ex in dm.train_dataset)
    assert 0 < stats["truncated"] < 503  # long answers are cut at max_length


def test_folder_is_its_files_in_order_each_validated_alone(tiny_tokenizer, tmp_path):
    """A folder reads as its .json/.jsonl files (sorted, README skipped); a bad row is named by its file and line."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "b.jsonl", [ADD])
    (tmp_path / "data" / "a.json").write_text(json.dumps([FRANCE, SHORT]))
    (tmp_path / "data" / "README.md").write_text("# my data")
    dm = InstructionDataModule(str(tmp_path / "data"), val_path=str(tmp_path / "data" / "b.jsonl"))
    dm.connect(tiny_tokenizer).setup()
    alone = InstructionDataModule(str(tmp_path / "data" / "a.json"), val_path=str(tmp_path / "data" / "b.jsonl"))
    alone.connect(tiny_tokenizer).setup()
    assert [ex["input_ids"] for ex in dm.train_dataset][:2] == [ex["input_ids"] for ex in alone.train_dataset]
    assert dm.stats()["train_rows"] == 3
    write_jsonl(tmp_path / "data" / "c.jsonl", [FRANCE, {"instruction": 123, "output": "x"}])
    with pytest.raises(DataError, match=r"data/c\.jsonl line 2: "):
        InstructionDataModule(str(tmp_path / "data"), val_split=1).connect(tiny_tokenizer).setup()
    with pytest.raises(DataError, match="folder has no .json or .jsonl files"):
        (tmp_path / "empty").mkdir()
        InstructionDataModule(str(tmp_path / "empty")).connect(tiny_tokenizer).setup()


def test_tokenizer_by_path_and_missing(tiny_tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [FRANCE, ADD])
    dm = InstructionDataModule(str(path), val_path=str(path), tokenizer=str(tiny_tokenizer_dir))
    assert dm.tokenizer is None
    dm.setup()
    assert dm.tokenizer is not None and dm.stats()["train_rows"] == 2
    with pytest.raises(DataError, match=r"no tokenizer: pass tokenizer=.*connect\(tokenizer\)"):
        InstructionDataModule(str(path)).setup()
    with pytest.raises(DataError, match="tokenizer '/no/such/tokenizer': cannot load"):
        InstructionDataModule(str(path), tokenizer="/no/such/tokenizer").setup()


def test_hub_dataset_name(tiny_tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "org/missing":
            raise FileNotFoundError("Couldn't find a dataset script\nmore details")
        return datasets.Dataset.from_list(numbered(10))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = InstructionDataModule("org/alpaca-like", val_path="org/alpaca-like:test[:3]").connect(tiny_tokenizer)
    dm.setup()
    assert calls == [("org/alpaca-like", "train"), ("org/alpaca-like", "test[:3]")]
    assert dm.stats()["train_rows"] == 10
    with pytest.raises(DataError) as err:
        InstructionDataModule("org/missing").prepare_data()
    assert str(err.value) == (
        "org/missing: not a local file, and datasets.load_dataset failed "
        "(FileNotFoundError: Couldn't find a dataset script); check the path or dataset name"
    )


# ---------------------------------------------------------------- bad input

GOOD = json.dumps(FRANCE)
GOOD_CHAT = json.dumps({"messages": CHAT["messages"][1:3]})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "{p}: file not found (relative paths start at "),
        ("bad.jsonl", b"\xff\xfe\x00garbage", "{p}: cannot read file (not UTF-8 text: invalid start byte)"),
        ("empty.jsonl", "", "{p}: file is empty (no rows); add rows or point to the right file"),
        ("blank.jsonl", "\n  \n", "{p}: file is empty (no rows)"),
        ("empty.json", "[]", "{p}: file is empty (no rows)"),
        (
            "data.jsonl",
            "\n".join([GOOD] * 6 + ['{"instruction": "x" "output": "y"}']),
            "{p} line 7: invalid JSON (Expecting ',' delimiter); fix or remove the row",
        ),
        ("gaps.jsonl", f"{GOOD}\n\n{GOOD}\n\n{{oops\n", "{p} line 5: invalid JSON (Expecting property name"),
        (
            "data.jsonl",
            "\n".join([GOOD] * 3 + ['{"instruction": "x"}']),
            "{p} line 4: missing required key 'output' (alpaca rows need 'instruction' and 'output')",
        ),
        (
            "data.jsonl",
            GOOD + '\n{"instruction": "x", "output": 5}',
            "{p} line 2: 'output' must be a string, got int; fix or remove the row",
        ),
        ("data.jsonl", GOOD + '\n{"instruction": "x", "input": ["a"], "output": "y"}', "{p} line 2: 'input' must be"),
        ("data.jsonl", GOOD + "\n[1, 2]", "{p} line 2: expected a JSON object, got list; fix or remove the row"),
        (
            "chat.jsonl",
            "\n".join([GOOD_CHAT, GOOD_CHAT, '{"messages": "hello"}']),
            "{p} line 3: 'messages' must be a non-empty list of {{role, content}} objects, got str",
        ),
        ("chat.jsonl", GOOD_CHAT + '\n{"messages": []}', "{p} line 2: 'messages' must be a non-empty list"),
        (
            "chat.jsonl",
            GOOD_CHAT + '\n{"messages": [{"role": "user", "content": "hi"}]}',
            "{p} line 2: no assistant turn; add a message with role 'assistant' or remove the row",
        ),
        (
            "chat.jsonl",
            GOOD_CHAT + '\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
            "{p} line 2: messages[1] must be an object with string 'role' and 'content'",
        ),
        (
            "prompts.jsonl",
            '{"prompt": "a", "completion": "b"}',
            "{p} line 1: unknown row format (keys: 'prompt', 'completion'); expected 'instruction'/'output' (alpaca)",
        ),
        ("data.json", '{"rows": []}', "{p}: expected a JSON list of rows, got dict; use a list or .jsonl"),
        ("data.json", '[\n{"instruction": }]', "{p}: invalid JSON at line 2 column 17 (Expecting value); fix the file"),
        ("data.json", f'[{GOOD}, {{"instruction": 3, "output": "x"}}]', "{p} row 2: 'instruction' must be a string"),
        ("data.csv", "instruction,output\na,b\n", "{p}: unsupported file type '.csv'; use .json (a list of rows) or"),
    ],
)
def test_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    dm = InstructionDataModule(str(path), val_path=str(path))
    with pytest.raises(DataError) as err:
        dm.prepare_data()  # no tokenizer needed: input is validated before anything else happens
    assert str(err.value).startswith(message.format(p=path))
    assert "\n" not in str(err.value)


def test_bad_input_other_sources(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"^pkg://no_such_pkg_xyz/a.jsonl: package 'no_such_pkg_xyz' is not installed"):
        InstructionDataModule("pkg://no_such_pkg_xyz/a.jsonl").prepare_data()
    with pytest.raises(DataError, match="no file 'data/nope.jsonl' in package 'zaragoza_construction_faq'"):
        InstructionDataModule("pkg://zaragoza_construction_faq/data/nope.jsonl").prepare_data()
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=r"folder.jsonl: folder has no .json or .jsonl files"):
        InstructionDataModule(str(folder)).prepare_data()
    with pytest.raises(DataError, match=r"^data/train.jsonl: file not found"):
        InstructionDataModule("data/train.jsonl").prepare_data()
    path = write_jsonl(tmp_path / "alpaca.jsonl", [FRANCE])
    with pytest.raises(DataError, match=r"alpaca.jsonl line 1: missing required key 'messages' .* one format per file"):
        InstructionDataModule(str(path), val_path=str(path), format="chat").prepare_data()
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [FRANCE, CHAT])
    with pytest.raises(DataError, match=r"mixed.jsonl line 2: missing required key 'instruction' .* chat row"):
        InstructionDataModule(str(mixed), val_path=str(mixed)).prepare_data()
    for kwargs, match in [
        ({"format": "sharegpt"}, "unknown format 'sharegpt'; use one of auto, alpaca, chat"),
        ({"prompt_style": "llama"}, "unknown prompt_style 'llama'"),
        ({"on_long_prompt": "truncate"}, "unknown on_long_prompt 'truncate'"),
        ({"max_length": 0}, "max_length must be >= 1"),
    ]:
        with pytest.raises(DataError, match=match):
            InstructionDataModule(str(path), **kwargs)
