"""``lightning-qlora export`` end to end on a tiny Llama: GGUF, merged safetensors and PEFT, from a PEFT folder, a LoRA
checkpoint or a recipe; bad input ends with one ``lightning-qlora: error:`` line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_qlora.cli.main import main
from lightning_qlora.lora.fingerprint import fingerprint_parts
from lightning_qlora.lora.layer import (
    LoRAConfig,
    inject_lora,
    is_lora_parameter,
    lora_modules,
    mark_only_lora_trainable,
)
from lightning_qlora.lora.peft_format import export_peft
from lightning_qlora.models.gguf_export import GGUF_FILE_NAME
from lightning_qlora.models.sources import load_causal_lm
from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0)
NF4 = QuantizationConfig(compute_dtype=torch.float32)


def save_checkpoint(path, state, trained, tiny_llama_dir) -> None:
    """A Lightning checkpoint as the LoRA callback saves it: the CausalLM's own names, trained tensors only."""
    checkpoint = {
        "state_dict": state,
        "lightning_qlora": {
            "lora": LORA.to_dict(),
            "trainable_keys": sorted(state),
            "base": fingerprint_parts(trained, NF4.describe()),
        },
        "hyper_parameters": {"model": str(tiny_llama_dir), "dtype": "fp32"},
        "NF4Precision": {"quantization": NF4.describe()},
    }
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    """``(PEFT folder, LoRA checkpoint, {layer: (A, B)})`` of one random adapter on the tiny Llama."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    inject_lora(model, LORA)
    gen = torch.Generator().manual_seed(5)
    pairs = {}
    with torch.no_grad():
        for name, layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
            pairs[name] = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    export_peft(model, root / "peft", LORA, base_model_name_or_path=str(tiny_llama_dir))
    state = {f"model.{n}.lora_{w}": t for n, (a, b) in pairs.items() for w, t in (("A", a), ("B", b))}
    trained = load_causal_lm(tiny_llama_dir, NF4, dtype=torch.float32)  # the base as the training run saw it
    inject_lora(trained, LORA)
    trained.requires_grad_(False)
    save_checkpoint(root / "last.ckpt", state, trained, tiny_llama_dir)
    return root / "peft", root / "last.ckpt", pairs


HEAD = "base_model.model.lm_head.weight"


@pytest.fixture(scope="module")
def head_adapters(tiny_llama_dir, tmp_path_factory):
    """``(PEFT folder, LoRA checkpoint, the fp32 model they hold)``: random adapters plus a trained ``lm_head``, as
    ``LoRA(trainable_modules=["lm_head"])`` leaves them."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("head_adapters")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    inject_lora(model, LORA)
    mark_only_lora_trainable(model, ["lm_head"])
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.05)
    export_peft(model, root / "peft", LORA, base_model_name_or_path=str(tiny_llama_dir))
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items() if is_lora_parameter(k)}
    state["model.lm_head.weight"] = model.lm_head.weight.detach().clone()
    trained = load_causal_lm(tiny_llama_dir, NF4, dtype=torch.float32)  # the base as the training run saw it
    inject_lora(trained, LORA)
    mark_only_lora_trainable(trained, ["lm_head"])
    save_checkpoint(root / "last.ckpt", state, trained, tiny_llama_dir)
    return root / "peft", root / "last.ckpt", model


def run(args, capsys):
    capsys.readouterr()
    code = 0
    try:
        main(["export", *map(str, args)])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_gguf_from_a_checkpoint_merges_into_the_4bit_base_it_was_trained_on(tiny_llama_dir, adapters, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, ckpt, pairs = adapters
    code, out, err = run(["--format", "gguf", "--adapter", ckpt, "--out", tmp_path / "gguf"], capsys)
    assert code == 0, err
    assert "(llama, f16," in out and "14 layers merged into the dequantized 4-bit base" in out
    assert (tmp_path / "gguf" / "Modelfile").read_text().startswith("# ollama create")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=GGUF_FILE_NAME, dtype=torch.float32)
    base = load_causal_lm(tiny_llama_dir, NF4, dtype=torch.float32)  # the base the checkpoint's run trained on
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        a, b = pairs[name]
        exact = dequantize_weight(base.get_submodule(name), torch.float64) + LORA.scaling * b.double() @ a.double()
        assert torch.equal(back.get_submodule(name).weight, exact.float().half().float()), name


def test_safetensors_from_a_peft_folder_equals_peft_merge(tiny_llama_dir, adapters, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_dir, _, _ = adapters
    args = ["--format", "safetensors", "--adapter", peft_dir, "--model", tiny_llama_dir, "--base-weights", "original"]
    code, _, err = run([*args, "--dtype", "fp32", "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    anchor = PeftModel.from_pretrained(base, peft_dir).merge_and_unload().eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, anchor(ids).logits, rtol=0, atol=1e-5)
    text = "The quick brown fox"
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").encode(text) == (
        AutoTokenizer.from_pretrained(tiny_llama_dir).encode(text)
    )


def test_safetensors_by_default_merges_into_the_4bit_base_and_loads_in_transformers(
    tiny_llama_dir, adapters, tmp_path, capsys
):
    """The README's command: no ``--base-weights``, so the adapter goes into the NF4 weights it was trained against."""
    from transformers import AutoModelForCausalLM

    _, ckpt, pairs = adapters
    code, out, err = run(
        ["--format", "safetensors", "--adapter", ckpt, "--dtype", "fp32", "--out", tmp_path / "m"], capsys
    )
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    base = load_causal_lm(tiny_llama_dir, NF4, dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a, b = pairs[name]
        exact = dequantize_weight(base.get_submodule(name), torch.float64) + LORA.scaling * b.double() @ a.double()
        torch.testing.assert_close(back.get_submodule(name).weight, exact.float(), rtol=0, atol=1e-6)


def test_peft_from_a_checkpoint_keeps_the_adapter(adapters, tmp_path, capsys):
    _, ckpt, pairs = adapters
    code, out, err = run(["--format", "peft", "--adapter", ckpt, "--out", tmp_path / "peft"], capsys)
    assert code == 0, err
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(pairs)
    for name, (a, b) in pairs.items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], a)
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], b)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (LORA.r, LORA.alpha)


def test_peft_from_a_checkpoint_keeps_the_trained_head(tiny_llama_dir, head_adapters, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, ckpt, model = head_adapters
    code, _, err = run(["--format", "peft", "--adapter", ckpt, "--out", tmp_path / "peft"], capsys)
    assert code == 0, err
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert torch.equal(tensors[HEAD], model.lm_head.weight)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_safetensors_from_a_peft_folder_keeps_the_trained_head(tiny_llama_dir, head_adapters, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_dir, _, model = head_adapters
    args = ["--format", "safetensors", "--adapter", peft_dir, "--model", tiny_llama_dir, "--base-weights", "original"]
    code, _, err = run([*args, "--dtype", "fp32", "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.equal(ours.lm_head.weight, model.lm_head.weight)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    anchor = PeftModel.from_pretrained(base, peft_dir).merge_and_unload().eval()  # peft keeps modules_to_save
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, anchor(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_gguf_from_a_checkpoint_keeps_the_trained_head(head_adapters, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, ckpt, model = head_adapters
    code, _, err = run(["--format", "gguf", "--adapter", ckpt, "--out", tmp_path / "gguf"], capsys)
    assert code == 0, err
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=GGUF_FILE_NAME, dtype=torch.float32)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.half().float())  # f16, as written


def test_a_fit_with_a_trainable_head_exports_it_both_ways(tiny_llama_dir, tmp_path, capsys):
    """``LoRA(trainable_modules=["lm_head"], export_dir=...)``: the end-of-fit adapter and ``export --format peft``
    of the run's checkpoint both hold the trained head (and the same adapter)."""
    import lightning.pytorch as pl

    from lightning_qlora import CausalLM, InstructionDataModule, LoRA, NF4Precision

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} {i} {i}."}) + "\n"
                            for i in range(8)))  # fmt: skip
    lora = LoRA(r=4, alpha=8, dropout=0.0, trainable_modules=["lm_head"], export_dir=str(tmp_path / "adapter"))
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, num_sanity_val_steps=0, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         plugins=[NF4Precision(compute_dtype="fp32")], callbacks=[lora])  # fmt: skip
    module = CausalLM(model=str(tiny_llama_dir), dtype="fp32", lr=1e-2)
    trainer.fit(module, InstructionDataModule(str(rows), max_length=64, batch_size=2, val_split=2))
    head = module.model.lm_head.weight.detach()
    assert not torch.equal(head, load_file(tiny_llama_dir / "model.safetensors")["lm_head.weight"])  # it trained
    at_fit_end = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert torch.equal(at_fit_end[HEAD], head)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    code, _, err = run(["--format", "peft", "--adapter", ckpt, "--out", tmp_path / "exported"], capsys)
    assert code == 0, err
    exported = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    assert exported.keys() == at_fit_end.keys() and all(torch.equal(exported[k], at_fit_end[k]) for k in exported)
    for folder in ("adapter", "exported"):
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["lm_head"], folder


def test_gguf_from_the_training_recipe(tiny_llama_dir, adapters, tmp_path, capsys):
    from gguf import GGUFReader

    recipe = {
        "trainer": {
            "plugins": [{"class_path": "lightning_qlora.NF4Precision", "init_args": {"compute_dtype": "fp32"}}],
            "callbacks": [{"class_path": "lightning_qlora.LoRA", "init_args": {"r": 4, "alpha": 8}}],
        },
        "model": {"class_path": "lightning_qlora.CausalLM", "init_args": {"model": str(tiny_llama_dir)}},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = ["--format", "gguf", "--dtype", "q8_0", "--config", tmp_path / "recipe.yaml", "--adapter", adapters[0]]
    code, out, err = run([*args, "--out", tmp_path / "gguf", "--name", "tiny-faq"], capsys)
    assert code == 0, err
    assert "merged into the dequantized 4-bit base" in out
    reader = GGUFReader(tmp_path / "gguf" / GGUF_FILE_NAME)
    assert reader.fields["general.name"].contents() == "tiny-faq"
    assert reader.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0


def _gpt2_config_dir(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=64, n_layer=1, n_head=4).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def _other_llama_dir(tmp_path, **overrides):
    from conftest import build_tiny_llama

    build_tiny_llama(**overrides).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


BAD = {
    "missing adapter": (
        lambda d, a, t: ["--format", "gguf", "--adapter", t / "nope", "--model", d],
        "nope does not exist",
    ),
    "unknown format": (lambda d, a, t: ["--format", "onnx", "--model", d], "argument --format: invalid choice: 'onnx'"),
    "gguf dtype": (
        lambda d, a, t: ["--format", "gguf", "--dtype", "q4_0", "--model", d],
        "--dtype 'q4_0' does not apply to --format gguf; use one of bf16, f16, q8_0",
    ),  # fmt: skip
    "safetensors dtype": (
        lambda d, a, t: ["--format", "safetensors", "--dtype", "q8_0", "--model", d],
        "use one of bf16, f16, fp32",
    ),  # fmt: skip
    "peft without adapter": (lambda d, a, t: ["--format", "peft", "--model", d], "--format peft needs --adapter"),
    "no base model": (lambda d, a, t: ["--format", "gguf"], "pass --model (the base model) or --config"),
    "unsupported architecture": (
        lambda d, a, t: ["--format", "gguf", "--model", _gpt2_config_dir(t)],
        "GGUF export does not support model_type 'gpt2' (supported: llama, mistral, qwen2, qwen3)",
    ),  # refused from config.json alone: that folder has no weights to load
    "checkpoint without LoRA": (
        lambda d, a, t: (
            torch.save({"state_dict": {}}, t / "plain.ckpt"),
            ["--format", "gguf", "--adapter", t / "plain.ckpt"],
        )[1],
        "has no LoRA adapter settings",
    ),
    "missing base model": (
        lambda d, a, t: ["--format", "peft", "--adapter", a[1], "--model", "pkg://nowhere_pkg/x.gguf"],
        "package 'nowhere_pkg' is not installed",
    ),
    "checkpoint of another base": (
        lambda d, a, t: ["--format", "peft", "--adapter", a[1], "--model", _other_llama_dir(t, seed=1)],
        "does not belong to this base model: it was written for a base model with other weights",
    ),
    "peft adapter of another shape": (
        lambda d, a, t: ["--format", "peft", "--adapter", a[0], "--model", _other_llama_dir(t, intermediate_size=192)],
        "this is an adapter for a different base model",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tiny_llama_dir, adapters, tmp_path, capsys):
    make, expected = BAD[case]
    code, out, err = run([*make(tiny_llama_dir, adapters, tmp_path), "--out", tmp_path / "out"], capsys)
    assert code == 2
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.strip()]
    assert lines[-1].startswith("lightning-qlora: error: ") and expected in lines[-1], err  # above it: load progress
    assert sum("error" in line for line in lines) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_is_an_input_is_refused_and_left_alone(tiny_llama_dir, adapters, tmp_path, capsys):
    peft_dir = adapters[0]
    cases = [
        (["--format", "safetensors", "--adapter", peft_dir, "--model", tiny_llama_dir], tiny_llama_dir, "base model"),
        (["--format", "peft", "--adapter", peft_dir], peft_dir, "adapter"),
    ]
    for args, folder, what in cases:
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        code, _, err = run([*args, "--out", folder], capsys)
        assert code == 2 and f"--out {folder} is the folder of the {what}, which the export would replace" in err, err
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
