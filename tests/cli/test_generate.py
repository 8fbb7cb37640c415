"""`lightning-qlora generate`: 4-bit base + adapter through Lightning's predict, token-identical to transformers on the
merged weights; adapters from PEFT folders and Lightning checkpoints; outputs replaced whole or kept."""

import json
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_qlora import CausalLM, NF4Precision
from lightning_qlora.callbacks.base_check import CHECKPOINT_KEY, BaseCheck
from lightning_qlora.cli.inference import load_for_inference
from lightning_qlora.cli.main import main
from lightning_qlora.lora.layer import LoRAConfig, adapters_disabled, inject_lora, is_lora_parameter, lora_modules
from lightning_qlora.lora.merge import merge_lora, save_merged_safetensors
from lightning_qlora.lora.peft_format import export_peft
from lightning_qlora.models.generation import GenerationOptions, encode_prompts, generate
from lightning_qlora.utils.modules import model_root

SYSTEM = "Answer briefly."
ROWS = [
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Add two numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "the quick brown fox", "id": "fox"},
]
NEW_TOKENS = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def write_recipe(root, model_dir, rows_path, adapter_dir):
    recipe = {
        "trainer": {
            "plugins": [{"class_path": "lightning_qlora.NF4Precision", "init_args": {"compute_dtype": "fp32"}}],
            "callbacks": [
                {"class_path": "lightning_qlora.LoRA", "init_args": {"r": 8, "export_dir": str(adapter_dir)}}
            ],
        },
        "model": {"class_path": "lightning_qlora.CausalLM", "init_args": {"model": str(model_dir), "dtype": "fp32"}},
        "data": {
            "class_path": "lightning_qlora.InstructionDataModule",
            "init_args": {"path": str(rows_path), "system_prompt": SYSTEM},
        },
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def build_adapter(model_dir, root):
    """A random (non-zero) adapter on the 4-bit base, saved as a PEFT folder and an adapter-only Lightning checkpoint.

    Returns the greedy answers of the 4-bit base with the adapter off, and the merged model's folder: the same
    dequantized base weights plus ``scaling·B·A``, as plain fp32 weights transformers loads.
    """
    module, trainer = (
        CausalLM(str(model_dir), dtype="fp32"),
        pl.Trainer(plugins=[NF4Precision(compute_dtype="fp32")], logger=False, enable_progress_bar=False),
    )
    load_for_inference(module, trainer)
    config = LoRAConfig(r=8, alpha=16, dropout=0.0)
    inject_lora(module, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_modules(module):
            layer.lora_B.normal_(0, 0.5)
    export_peft(model_root(module), root / "adapter", config)
    trainable = {name for name, _ in module.named_parameters() if is_lora_parameter(name)}
    torch.save(
        {
            "state_dict": {k: v for k, v in module.state_dict().items() if k in trainable},
            "global_step": 5,
            CHECKPOINT_KEY: BaseCheck(config).metadata(trainer, module, trainable),
        },
        root / "adapter.ckpt",
    )
    batch = encode_prompts(module.tokenizer, [render(module.tokenizer, row) for row in ROWS], False)
    with torch.no_grad(), adapters_disabled(module):
        base = generate(
            module.model, module.tokenizer, batch["input_ids"], batch["attention_mask"], GenerationOptions(NEW_TOKENS)
        )
    root_model = model_root(module)
    merge_lora(root_model, "bf16", dtype=torch.float32)
    root_model.hf_quantizer.remove_quantization_config(root_model)  # plain weights now: transformers may save them
    save_merged_safetensors(root_model, root / "merged")
    module.tokenizer.save_pretrained(root / "merged")
    return [c.text for c in base], root / "merged"


def render(tokenizer, row):
    """The prompt as training renders it, written out with transformers' own chat template call."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    rows = root / "prompts.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base_answers, merged = build_adapter(tiny_llama_dir, root)
    return {"root": root, "rows": rows, "recipe": write_recipe(root, tiny_llama_dir, rows, root / "adapter"),
            "base": base_answers, "merged": merged}  # fmt: skip


def run_generate(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    try:
        main(["generate", *args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def predictions(run):
    """Predictions with the recipe's adapter (its LoRA export_dir: the PEFT folder), in batches of 2."""
    out = run["root"] / "out.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lightning-qlora"])
        main(["generate", "--config", str(run["recipe"]), "--prompts", str(run["rows"]), "--output", str(out),
              "--max_new_tokens", str(NEW_TOKENS), "--batch_size", "2"])  # fmt: skip
    return read(out)


def test_greedy_generation_is_token_identical_to_transformers_on_the_merged_weights(run, predictions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run["merged"])
    merged = AutoModelForCausalLM.from_pretrained(run["merged"], dtype=torch.float32).eval()
    assert [p["index"] for p in predictions] == [0, 1, 2] and predictions[2]["id"] == "fox"
    assert [p.get("reference") for p in predictions] == ["Paris.", "5", None]
    for row, prediction, base in zip(ROWS, predictions, run["base"]):
        ids = tokenizer(render(tokenizer, row), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = merged.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1] :].tolist()
        new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        assert prediction["completion_tokens"] == len(new) and prediction["prompt_tokens"] == ids.shape[1]
        assert prediction["completion"] == tokenizer.decode(new, skip_special_tokens=True)
        assert prediction["finish_reason"] == ("length" if len(new) == NEW_TOKENS else "stop")
        assert prediction["completion"] != base  # the adapter changes the answer: the comparison can fail


def test_a_checkpoint_adapter_predicts_as_its_peft_export(run, predictions, capsys, monkeypatch):
    out = run["root"] / "from_ckpt.jsonl"
    args = ["--config", str(run["recipe"]), "--adapter", str(run["root"] / "adapter.ckpt"), "--prompts",
            str(run["rows"]), "--output", str(out), "--max_new_tokens", str(NEW_TOKENS)]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_generate(args, capsys, monkeypatch)
    assert code == 0, err
    assert not [w for w in caught if "LeafSpec" in str(w.message)]  # Lightning's own deprecation: not the user's
    assert "checkpoint" in err and "step 5" in err
    assert [p["completion"] for p in read(out)] == [p["completion"] for p in predictions]


def test_a_failed_run_keeps_the_old_output_and_leaves_no_temp_file(run, capsys, monkeypatch):
    rows = run["root"] / "long.jsonl"
    rows.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"instruction": "fox " * 300}) + "\n")
    out = run["root"] / "kept.jsonl"
    out.write_text("old\n")
    args = ["--config", str(run["recipe"]), "--prompts", str(rows), "--output", str(out), "--batch_size", "1",
            "--max_new_tokens", "2"]  # fmt: skip
    code, err = run_generate(args, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("lightning-qlora: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "long.jsonl line 2: the prompt is" in errors[0] and "context window is 256 tokens" in errors[0], err
    assert "lightning-qlora generate: " not in err  # refused before the model loaded
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in run["root"].iterdir() if p.name.startswith(".kept")) == []


def test_a_bad_row_is_one_line_naming_it(run, capsys, monkeypatch):
    rows = run["root"] / "bad.jsonl"
    rows.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"instruction": 3}) + "\n")
    args = ["--config", str(run["recipe"]), "--prompts", str(rows), "--output", str(run["root"] / "x.jsonl")]
    code, err = run_generate(args, capsys, monkeypatch)
    assert code == 2 and "bad.jsonl line 2: 'instruction' must be a string" in err
    assert not (run["root"] / "x.jsonl").exists()


def test_a_checkpoint_of_another_base_is_refused_in_one_line(run, capsys, monkeypatch):
    checkpoint = torch.load(run["root"] / "adapter.ckpt", weights_only=True)
    values = checkpoint[CHECKPOINT_KEY]["base"]["values"]
    values["model.embed_tokens.weight"] = "0" * 16  # the base it was trained on had other embeddings
    torch.save(checkpoint, run["root"] / "other_base.ckpt")
    out = run["root"] / "other_base.jsonl"
    args = ["--config", str(run["recipe"]), "--adapter", str(run["root"] / "other_base.ckpt"), "--prompts",
            str(run["rows"]), "--output", str(out)]  # fmt: skip
    code, err = run_generate(args, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1, err
    assert errors[0].startswith("lightning-qlora: error: checkpoint ") and (
        "does not belong to this base model: it was written for a base model with other weights (1 tensors differ, "
        "e.g. model.embed_tokens.weight); use the base model and recipe it was trained with" in errors[0]
    ), err
    assert not out.exists()


def test_an_output_that_is_the_prompts_file_is_refused(run, capsys, monkeypatch):
    rows = run["root"] / "same.jsonl"
    rows.write_text(json.dumps(ROWS[0]) + "\n")
    args = ["--config", str(run["recipe"]), "--prompts", str(rows), "--output", str(rows)]
    code, err = run_generate(args, capsys, monkeypatch)
    assert code == 2 and f"--output {rows} is the --prompts file" in err, err
    assert rows.read_text() == json.dumps(ROWS[0]) + "\n"
