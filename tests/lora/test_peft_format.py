"""PEFT adapter export/import, checked against peft itself as the client."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file

from lightning_qlora.lora.layer import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    is_lora_parameter,
    lora_modules,
    mark_only_lora_trainable,
)
from lightning_qlora.lora.peft_format import export_peft, import_peft
from lightning_qlora.quantization.nf4 import QuantizationConfig, guard_cpu_repack
from lightning_qlora.quantization.shells import quantize_model
from lightning_qlora.utils import atomic

peft = pytest.importorskip("peft")

QCONFIG = QuantizationConfig(compute_dtype=torch.float32)
ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
SAFETENSORS = "adapter_model.safetensors"


def randomize_b(model, seed=1, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


def lora_model(base, config=None, quantize=False, seed=1):
    model = copy.deepcopy(base)
    inject_lora(model, config or LoRAConfig(r=8, alpha=16, dropout=0.0))
    randomize_b(model, seed)
    if quantize:
        quantize_model(model, QCONFIG)
    return model.eval()


@torch.no_grad()
def logits(model, ids):
    guard_cpu_repack(model)
    return model(ids).logits


def load_with_peft(base_model, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base_model, str(directory))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "adapter" in m.lower() or "unexpected" in m.lower()], messages
    return model.eval()


def peft_adapted(peft_model):
    from peft.tuners.lora import LoraLayer

    root = peft_model.base_model.model
    return {name for name, m in root.named_modules() if isinstance(m, LoraLayer)}


def test_export_writes_peft_layout(base, tmp_path):
    model = lora_model(base)
    out = export_peft(model, tmp_path / "adapter", LoRAConfig(r=8, alpha=16, dropout=0.0), base_model_name_or_path="b")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folder left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * 14
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (8, 64) and b.shape == (64, 8) and a.dtype == torch.float32
    assert torch.equal(b, model.model.layers[1].mlp.down_proj.lora_B)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == "b"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (8, 16, 0.0, False)
    assert cfg["target_modules"] == ALL_LINEAR
    assert cfg["bias"] == "none" and cfg["inference_mode"] is True and cfg["fan_in_fan_out"] is False


def test_peft_loads_export_fp32(base, ids, tmp_path):
    model = lora_model(base)
    export_peft(model, tmp_path, LoRAConfig(r=8, alpha=16, dropout=0.0))
    theirs = load_with_peft(copy.deepcopy(base), tmp_path)
    assert peft_adapted(theirs) == {n for n, _ in lora_modules(model)}
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_peft_loads_export_onto_4bit_base(base, ids, tmp_path):
    model = lora_model(base, quantize=True)
    export_peft(model, tmp_path, LoRAConfig(r=8, alpha=16, dropout=0.0))
    fresh = copy.deepcopy(base)
    quantize_model(fresh, QCONFIG)
    ours_4bit = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    theirs_4bit = fresh.state_dict()
    assert ours_4bit.keys() == theirs_4bit.keys()
    assert all(torch.equal(ours_4bit[k], theirs_4bit[k]) for k in theirs_4bit)  # quantization is deterministic
    theirs = load_with_peft(fresh, tmp_path)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_exclude_modules_exported_as_full_names(base, ids, tmp_path):
    config = LoRAConfig(r=8, alpha=16, dropout=0.0, exclude_modules=["model.layers.0.self_attn.q_proj"])
    model = lora_model(base, config)
    export_peft(model, tmp_path, config)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert "model.layers.1.self_attn.q_proj" in targets and "model.layers.0.self_attn.q_proj" not in targets
    theirs = load_with_peft(copy.deepcopy(base), tmp_path)
    assert peft_adapted(theirs) == {n for n, _ in lora_modules(model)}
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_mixed_ranks_use_rank_and_alpha_patterns(base, ids, tmp_path):
    config = LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"], use_rslora=True)
    model = lora_model(base, config)
    attn = model.model.layers[1].self_attn
    attn.v_proj = LoRALinear(attn.v_proj.base_layer, r=4, alpha=4.0, use_rslora=True)
    randomize_b(model, seed=3)
    export_peft(model, tmp_path, config)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {r"^model\.layers\.1\.self_attn\.v_proj": 4}
    assert cfg["alpha_pattern"] == {r"^model\.layers\.1\.self_attn\.v_proj": 4}
    theirs = load_with_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)
    fresh = copy.deepcopy(base)
    assert import_peft(fresh, tmp_path).use_rslora is True
    assert fresh.model.layers[1].self_attn.v_proj.r == 4
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "nf4"])
def test_round_trip(base, ids, tmp_path, quantize):
    config = LoRAConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj", "down_proj"])
    model = lora_model(base, config, quantize=quantize)
    export_peft(model, tmp_path, config)
    fresh = copy.deepcopy(base)
    if quantize:
        quantize_model(fresh, QCONFIG)
    loaded = import_peft(fresh, tmp_path)
    assert (loaded.r, loaded.alpha, loaded.dropout) == (8, 16.0, 0.05)
    assert loaded.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert {n for n, _ in lora_modules(fresh)} == {n for n, _ in lora_modules(model)}
    torch.testing.assert_close(logits(fresh.eval(), ids), logits(model, ids), atol=0, rtol=0)
    # importing again into the already-adapted model just reloads the weights
    randomize_b(fresh, seed=9)
    import_peft(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_import_adapter_saved_by_peft(base, ids, tmp_path, safe):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    theirs.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    ours = copy.deepcopy(base)
    loaded = import_peft(ours, tmp_path)
    assert (loaded.r, loaded.alpha, loaded.target_modules) == (4, 8.0, ["q_proj", "up_proj"])
    assert len(list(lora_modules(ours))) == 4
    torch.testing.assert_close(logits(ours.eval(), ids), logits(theirs.eval(), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_import_keeps_the_model_mode(base, ids, tmp_path, training):
    """Adapters imported into an eval model are in eval mode too: dropout off, two forwards agree exactly."""
    config = LoRAConfig(r=8, alpha=16, dropout=0.5)
    export_peft(lora_model(base, config), tmp_path, config)
    fresh = copy.deepcopy(base).train(training)
    import_peft(fresh, tmp_path)
    assert {m.training for m in fresh.modules()} == {training}
    if not training:
        torch.testing.assert_close(logits(fresh, ids), logits(fresh, ids), atol=0, rtol=0)


def test_adapter_dtype_is_kept_on_export(base, ids, tmp_path):
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], dtype="bf16")
    model = lora_model(base, config)
    export_peft(model, tmp_path, config)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert all(t.is_contiguous() for t in tensors.values())
    fresh = copy.deepcopy(base)
    import_peft(fresh, tmp_path)
    layer = fresh.model.layers[0].self_attn.q_proj
    assert layer.lora_B.dtype == torch.float32
    assert torch.equal(layer.lora_B, model.model.layers[0].self_attn.q_proj.lora_B.float())


def test_export_replaces_existing_adapter_atomically(base, tmp_path, monkeypatch):
    config = LoRAConfig(r=8, alpha=16, dropout=0.0)
    out = tmp_path / "adapter"
    first, second = lora_model(base, seed=1), lora_model(base, seed=2)
    export_peft(first, out, config)
    (out / "tokenizer.json").write_text("{}")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_peft(second, out, config)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert torch.equal(load_file(out / "adapter_model.safetensors")[key], first.model.layers[0].self_attn.q_proj.lora_B)

    for exchange in (True, False):  # renameat2(RENAME_EXCHANGE), then the rename-aside fallback
        if not exchange:
            monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        export_peft(second if exchange else first, out, config)
        expected = (second if exchange else first).model.layers[0].self_attn.q_proj.lora_B
        assert torch.equal(load_file(out / "adapter_model.safetensors")[key], expected)
        assert (out / "tokenizer.json").read_text() == "{}"
        assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_export_errors(base, tmp_path):
    with pytest.raises(ValueError, match="has no LoRA layers"):
        export_peft(copy.deepcopy(base), tmp_path, LoRAConfig())
    model = lora_model(base)
    with pytest.raises(ValueError, match="use_rslora=True"):
        export_peft(model, tmp_path, LoRAConfig(r=8, alpha=16, use_rslora=True))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        export_peft(model, tmp_path / "file", LoRAConfig(r=8, alpha=16))


@pytest.fixture()
def exported(base, tmp_path) -> Path:
    export_peft(lora_model(base), tmp_path / "adapter", LoRAConfig(r=8, alpha=16, dropout=0.0))
    return tmp_path / "adapter"


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rename_keys(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in load_file(path).items()}, str(path))


def _truncate(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


ERROR_CASES = {
    "missing_dir": (lambda d: d.rename(d.with_name("gone")), "does not exist"),
    "missing_config": (lambda d: (d / "adapter_config.json").unlink(), r"adapter_config\.json is missing"),
    "missing_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "has neither"),
    "bad_json": (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
    "not_lora": (lambda d: _edit_config(d, peft_type="IA3"), "'IA3' adapter; import_peft reads LoRA"),
    "dora": (lambda d: _edit_config(d, use_dora=True), "uses DoRA"),
    "unknown_keys": (_rename_keys, "name modules LlamaForCausalLM does not have"),
    "truncated": (_truncate, "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_import_errors(base, exported, case):
    damage, message = ERROR_CASES[case]
    damage(exported)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message) as info:
        import_peft(fresh, exported)
    assert "\n" not in str(info.value)
    assert not list(lora_modules(fresh))  # validated before anything was injected


def test_import_errors_for_a_different_base(base, exported):
    other = build_tiny_llama(intermediate_size=192)
    with pytest.raises(ValueError, match="adapter for a different base model") as info:
        import_peft(other, exported)
    assert "adapter_model.safetensors" in str(info.value)
    assert not list(lora_modules(other))
    adapted = copy.deepcopy(base)
    inject_lora(adapted, LoRAConfig(r=4, alpha=16, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has a LoRA adapter with r=4"):
        import_peft(adapted, exported)


# ------------------------------------------------------------------------- modules trained besides the adapters
def with_trained(base, trainable, quantize=False, seed=4):
    """LoRA on all linear layers plus ``trainable`` modules kept trainable (as ``LoRA(trainable_modules=...)``
    freezes the model), with random B and the trainable modules' weights perturbed: a stand-in for a trained run."""
    model = lora_model(base, quantize=quantize)
    mark_only_lora_trainable(model, trainable)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not is_lora_parameter(name):
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def without_trained_modules(model, base):
    """``model`` with the modules it trained besides the adapters put back to the base's (what exporting loses)."""
    lost = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in lost.named_parameters():
            if param.requires_grad and not is_lora_parameter(name):
                param.copy_(base.get_parameter(name))
    return lost


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "nf4"])
def test_trained_head_and_norm_are_exported_as_modules_to_save(base, ids, tmp_path, quantize):
    model = with_trained(base, ["lm_head", "norm"], quantize=quantize)  # "norm": model.norm, not the layer norms
    export_peft(model, tmp_path, LoRAConfig(r=8, alpha=16, dropout=0.0))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head", "model.norm"]  # peft matches by endswith: "norm" would take 5
    assert "ensure_weight_tying" not in cfg
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(k for k in tensors if "lora_" not in k) == ["base_model.model.lm_head.weight",
                                                             "base_model.model.model.norm.weight"]  # fmt: skip
    assert torch.equal(tensors["base_model.model.lm_head.weight"], model.lm_head.weight)
    fresh = copy.deepcopy(base)
    if quantize:
        quantize_model(fresh, QCONFIG)
    expected = logits(model, ids)
    assert (logits(without_trained_modules(model, base), ids) - expected).abs().max() > 1e-2  # the head matters
    theirs = load_with_peft(fresh, tmp_path)
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "nf4"])
def test_trained_head_round_trips_through_import(base, ids, tmp_path, quantize):
    model = with_trained(base, ["lm_head"], quantize=quantize)
    export_peft(model, tmp_path / "a", LoRAConfig(r=8, alpha=16, dropout=0.0))
    fresh = copy.deepcopy(base)
    if quantize:
        quantize_model(fresh, QCONFIG)
    import_peft(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh.eval(), ids), logits(model, ids), atol=0, rtol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad and not is_lora_parameter(n)} == {
        "lm_head.weight"
    }  # the adapter's tensors trainable, the rest frozen: as the LoRA callback leaves a model
    export_peft(fresh, tmp_path / "b", LoRAConfig(r=8, alpha=16, dropout=0.0))  # written back whole
    first, second = load_file(tmp_path / "a" / SAFETENSORS), load_file(tmp_path / "b" / SAFETENSORS)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]


def test_trained_tied_embedding_is_exported_with_ensure_weight_tying(ids, tmp_path):
    """A trained embedding tied to the head: peft ties its head to the trained copy when the config says so."""
    tied = build_tiny_llama(tie_word_embeddings=True).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    model = with_trained(tied, ["embed_tokens"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    export_peft(model, tmp_path, LoRAConfig(r=8, alpha=16, dropout=0.0))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["modules_to_save"], cfg["ensure_weight_tying"]) == (["embed_tokens"], True)
    tensors = load_file(tmp_path / SAFETENSORS)  # peft reads the head's copy under its own name too
    head, embedding = tensors["base_model.model.lm_head.weight"], tensors["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(head, model.lm_head.weight) and torch.equal(embedding, head)
    expected = logits(model, ids)
    theirs = load_with_peft(copy.deepcopy(tied), tmp_path)
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=0)
    fresh = copy.deepcopy(tied)
    import_peft(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(logits(fresh.eval(), ids), expected, atol=0, rtol=0)


def peft_saved(base, tmp_path, modules_to_save, ensure_weight_tying=False):
    """An adapter peft itself saved, its LoRA B and ``modules_to_save`` copies perturbed; returns peft's model."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          modules_to_save=modules_to_save, ensure_weight_tying=ensure_weight_tying)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about a tied layer in modules_to_save without weight tying
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    theirs.save_pretrained(tmp_path)
    return theirs.eval()


@pytest.mark.parametrize(
    "tie, modules_to_save",
    [(False, ["lm_head", "model.norm"]), (False, ["embed_tokens"]), (True, ["embed_tokens"]), (True, ["lm_head"])],
    ids=["head+norm", "embedding", "tied-embedding", "tied-head"],
)
def test_import_modules_to_save_saved_by_peft(ids, tmp_path, tie, modules_to_save):
    base = build_tiny_llama(tie_word_embeddings=tie).eval()
    theirs = peft_saved(base, tmp_path, modules_to_save, ensure_weight_tying=tie)
    ours = copy.deepcopy(base)
    import_peft(ours, tmp_path)
    expected = logits(theirs, ids)
    assert (logits(base, ids) - expected).abs().max() > 1e-2
    torch.testing.assert_close(logits(ours.eval(), ids), expected, atol=1e-5, rtol=0)
    export_peft(ours, tmp_path / "again", LoRAConfig(r=4, alpha=8, dropout=0.0))  # and peft reads ours back
    again = load_with_peft(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(logits(again, ids), expected, atol=1e-5, rtol=0)


def test_import_refuses_a_tie_peft_undoes(ids, tmp_path):
    """Without ensure_weight_tying peft trains a copy of a tied embedding and keeps the head: import_peft cannot."""
    tied = build_tiny_llama(tie_word_embeddings=True).eval()
    peft_saved(tied, tmp_path, ["embed_tokens"])
    fresh = copy.deepcopy(tied)
    with pytest.raises(ValueError, match="trains model.embed_tokens.weight, which this model ties to lm_head.weight; "
                                         "without ensure_weight_tying peft unties them") as info:  # fmt: skip
        import_peft(fresh, tmp_path)
    assert "\n" not in str(info.value) and not list(lora_modules(fresh))


@pytest.fixture()
def exported_head(base, tmp_path) -> Path:
    export_peft(with_trained(base, ["lm_head"]), tmp_path / "adapter", LoRAConfig(r=8, alpha=16, dropout=0.0))
    return tmp_path / "adapter"


def _edit_tensors(directory: Path, change) -> None:
    path = directory / SAFETENSORS
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path))


HEAD = "base_model.model.lm_head.weight"
HEAD_ERROR_CASES = {
    "missing": (lambda d: _edit_tensors(d, lambda t: t.pop(HEAD)), "lacks base_model.model.lm_head.weight of its "
                                                                    "modules_to_save ['lm_head']; re-export it"),
    "not_listed": (lambda d: _edit_config(d, modules_to_save=None), "holds 'base_model.model.lm_head.weight', which is "
                                                                     "not a LoRA A/B matrix and its config lists no"),
    "extra": (lambda d: _edit_tensors(d, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)})),
              "holds base_model.model.model.norm.weight, which is neither a LoRA matrix nor a tensor of a module"),
    "shape": (lambda d: _edit_tensors(d, lambda t: t.update({HEAD: torch.ones(500, 64)})),
              "lm_head.weight is (500, 64) there and (512, 64) here; this is an adapter for a different base"),
    "lora_layer": (lambda d: _edit_config(d, modules_to_save=["q_proj"]), "modules_to_save model.layers.0.self_attn"
                                                                          ".q_proj holds the LoRA layer"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HEAD_ERROR_CASES))
def test_import_modules_to_save_errors(base, exported_head, case):
    damage, message = HEAD_ERROR_CASES[case]
    damage(exported_head)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        import_peft(fresh, exported_head)
    assert "\n" not in str(info.value)
    assert not list(lora_modules(fresh)) and torch.equal(fresh.lm_head.weight, base.lm_head.weight)  # nothing copied


def _inside_lora(base):
    model = lora_model(base)
    mark_only_lora_trainable(model, ["model.layers.0.self_attn.q_proj"])  # its full-precision base weight trains
    return model


def _head_with_frozen_bias(base):
    model = with_trained(base, ["lm_head"])
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(512), requires_grad=False)
    return model


def _shared_but_untied(base):
    model = lora_model(base)  # tie_word_embeddings=False, yet the head shares the embedding: peft cannot keep that
    model.lm_head.weight = model.model.embed_tokens.weight
    mark_only_lora_trainable(model, ["embed_tokens"])
    return model


EXPORT_ERROR_CASES = {
    "inside_lora": (_inside_lora, "model.layers.0.self_attn.q_proj.base_layer.weight is trained but belongs to the "
                                  "LoRA layer model.layers.0.self_attn.q_proj, which PEFT's modules_to_save cannot"),
    "frozen_beside": (_head_with_frozen_bias, "lm_head has trained and frozen parameters (lm_head.weight trains, "
                                              "lm_head.bias does not); PEFT's modules_to_save keeps whole modules"),
    "shared": (_shared_but_untied, "lm_head is trained and shares its weights with model.embed_tokens, which PEFT "
                                   "can keep only for an input embedding tied to weight-only heads"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EXPORT_ERROR_CASES))
def test_export_refuses_trained_modules_peft_cannot_hold(base, tmp_path, case):
    make, message = EXPORT_ERROR_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        export_peft(make(base), tmp_path / "adapter", LoRAConfig(r=8, alpha=16, dropout=0.0))
    assert "\n" not in str(info.value) and not (tmp_path / "adapter").exists()


def test_a_trained_module_with_children_is_saved_whole(base, ids, tmp_path):
    """A whole MLP trained (LoRA on attention only): one modules_to_save entry peft's suffix match gives it alone."""
    config = LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = lora_model(base, config)
    mark_only_lora_trainable(model, ["model.layers.1.mlp"])
    with torch.no_grad():
        for param in model.model.layers[1].mlp.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    export_peft(model, tmp_path, config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["1.mlp"]
    tensors = load_file(tmp_path / SAFETENSORS)
    assert sorted(k for k in tensors if "lora_" not in k) == [
        f"base_model.model.model.layers.1.mlp.{p}_proj.weight" for p in ("down", "gate", "up")
    ]
    expected = logits(model, ids)
    torch.testing.assert_close(logits(load_with_peft(copy.deepcopy(base), tmp_path), ids), expected, atol=1e-5, rtol=0)
    fresh = copy.deepcopy(base)
    import_peft(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh.eval(), ids), expected, atol=0, rtol=0)


MOE_WITH_DENSE_MLPS = {  # a dense first layer, routed experts and a shared expert, as the real models have
    "glm4_moe": {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
                 "topk_group": 1, "moe_intermediate_size": 64, "num_experts_per_tok": 2},
    "deepseek_v3": {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
                    "topk_group": 1, "moe_intermediate_size": 64, "num_experts_per_tok": 2, "q_lora_rank": 32,
                    "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
                    "num_key_value_heads": 4},
}  # fmt: skip


@pytest.mark.parametrize("arch", list(MOE_WITH_DENSE_MLPS))
def test_moe_dense_and_shared_mlp_adapters_load_in_peft(arch, ids, tmp_path):
    """peft's transformers-4 MoE conversion reads ``gate_proj``/``up_proj``/``down_proj`` targets as the fused
    experts' (peft issue #3711): written as ``target_parameters`` they load in peft with every adapter, logits equal."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_qlora.lora.experts import expert_lora_modules, inject_expert_lora

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, head_dim=16)  # fmt: skip
    config = AutoConfig.for_model(arch, **{**sizes, **MOE_WITH_DENSE_MLPS[arch]})  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).float().eval()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    lora = LoRAConfig(r=4, alpha=8, dropout=0.1)
    inject_lora(model, lora)
    assert inject_expert_lora(model, lora)
    mark_only_lora_trainable(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in [*lora_modules(model), *expert_lora_modules(model)]:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
    model.eval()
    expected = logits(model, ids)
    export_peft(model, tmp_path / "adapter", lora)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == [
        "experts.down_proj", "experts.gate_up_proj", "down_proj.weight", "gate_proj.weight", "up_proj.weight"
    ]  # fmt: skip
    assert not {"gate_proj", "up_proj", "down_proj"} & set(saved["target_modules"])
    theirs = load_with_peft(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter"
    )
    dense = {n for n, _ in lora_modules(model) if n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")}
    assert len(dense) == 6 and dense <= peft_adapted(theirs)
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=1e-5)
    ours = copy.deepcopy(base)
    back = import_peft(ours, tmp_path / "adapter")
    assert {"gate_proj", "up_proj", "down_proj"} <= set(back.target_modules)
    torch.testing.assert_close(logits(ours.eval(), ids), expected, rtol=0, atol=0)
