"""`SampleAnswers`: held-out questions answered by the base model (adapters off) and the fine-tuned one, each equal to
plain transformers greedy decoding of the matching weights; train/eval modes restored."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from transformers import AutoModelForCausalLM

from lightning_qlora import CausalLM, InstructionDataModule, SampleAnswers
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_modules
from lightning_qlora.lora.merge import merge_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(model, tokenizer, question, new_tokens):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        return tokenizer.decode(new[: new.index(tokenizer.eos_token_id)], skip_special_tokens=True).strip()
    return tokenizer.decode(new, skip_special_tokens=True).strip() + " …"


def test_held_out_answers_of_base_and_fine_tuned_model(tiny_llama_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"instruction": f"Say {i} twice.", "output": f"{i} {i}"}) + "\n" for i in range(8))
    )
    module = CausalLM(str(tiny_llama_dir), dtype="fp32")
    module.configure_model()
    data = InstructionDataModule(str(rows), val_split=3, max_length=64).connect(module.tokenizer)
    data.setup("fit")
    inject_lora(module, LoRAConfig(r=8, alpha=16, dropout=0.1))
    torch.manual_seed(4)
    with torch.no_grad():
        for _, layer in lora_modules(module):
            layer.lora_B.normal_(0, 0.5)
    module.train()  # as training leaves it: dropout on
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tuned = copy.deepcopy(module.model)
    merge_lora(tuned, "bf16", dtype=torch.float32)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=data, precision_plugin=Precision())
    callback = SampleAnswers(num_questions=2, max_new_tokens=6)

    callback.on_train_end(trainer, module)
    callback.on_fit_end(trainer, module)

    held_out = [r["where"] for r in data.val_dataset][:2]
    lines = rows.read_text().splitlines()
    questions = [json.loads(lines[int(w.rsplit(" ", 1)[1]) - 1])["instruction"] for w in held_out]
    assert [s["question"] for s in callback.samples] == questions
    tok = module.tokenizer
    expected_base = [greedy(base, tok, q, 6) for q in questions]
    assert [s["base"] for s in callback.samples] == expected_base
    assert [s["fine_tuned"] for s in callback.samples] == [greedy(tuned.eval(), tok, q, 6) for q in questions]
    assert expected_base != [s["fine_tuned"] for s in callback.samples]
    assert module.training and all(layer.training for _, layer in lora_modules(module))  # modes given back
    out = capsys.readouterr().out
    assert "base model (adapters off) vs the fine-tuned one" in out
    assert all(q in out for q in questions) and out.count("fine-tuned: ") == 2 and out.count("reference: ") == 2
