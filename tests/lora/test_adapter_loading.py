"""The one adapter loader (`lora/loading.py`): PEFT folders and LoRA checkpoints, into a bare transformers model or
the module the checkpoint was written from; a checkpoint of another base, without LoRA metadata, without tensors or
with tensors that do not fit is refused in one line before anything is copied."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn

from lightning_qlora.lora.fingerprint import fingerprint_parts
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, is_lora_parameter, lora_modules
from lightning_qlora.lora.loading import CHECKPOINT_KEY, adapter_kind, load_adapter, load_checkpoint_adapter
from lightning_qlora.lora.peft_format import export_peft

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0)


class Wrapper(nn.Module):
    """A LightningModule's shape: the transformers model under ``.model`` (checkpoint names start with ``model.``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def trained(seed: int = 0) -> Wrapper:
    """A wrapped tiny Llama with random adapters (B != 0), frozen as the LoRA callback freezes it."""
    module = Wrapper(build_tiny_llama())
    module.requires_grad_(False)
    inject_lora(module, LORA)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(module):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    return module


def checkpoint_of(module: Wrapper) -> dict:
    """What the LoRA callback saves: the adapter tensors under the module's names, its settings, the base parts."""
    state = {k: v.clone() for k, v in module.state_dict().items() if is_lora_parameter(k)}
    meta = {"lora": LORA.to_dict(), "trainable_keys": sorted(state), "base": fingerprint_parts(module.model, None)}
    return {"state_dict": state, "global_step": 7, CHECKPOINT_KEY: meta}


def adapters(root: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in root.state_dict().items() if is_lora_parameter(k)}


@pytest.fixture(scope="module")
def source():
    module = trained()
    return module, checkpoint_of(module)


def test_a_checkpoint_loads_into_the_module_it_was_written_from_and_into_a_bare_model(source, tmp_path):
    module, checkpoint = source
    (tmp_path / "last.ckpt").write_bytes(b"")  # read already: the loader only asks what kind of path it is
    wrapped = Wrapper(build_tiny_llama())
    assert load_adapter(wrapped, tmp_path / "last.ckpt", checkpoint, root=wrapped.model) == LORA
    bare = build_tiny_llama()
    load_checkpoint_adapter(bare, checkpoint, "last.ckpt")  # names lose their "model." prefix
    expected = adapters(module.model)
    for loaded in (adapters(wrapped.model), adapters(bare)):
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not any(p.requires_grad for n, p in bare.named_parameters() if not is_lora_parameter(n))


def test_a_peft_folder_loads_into_the_root(source, tmp_path):
    module, _ = source
    export_peft(module.model, tmp_path / "adapter", LORA)
    wrapped = Wrapper(build_tiny_llama())
    assert adapter_kind(tmp_path / "adapter") == "peft"
    assert load_adapter(wrapped, tmp_path / "adapter", root=wrapped.model).r == LORA.r
    assert all(torch.equal(adapters(wrapped.model)[k], v) for k, v in adapters(module.model).items())


def test_a_checkpoint_of_another_base_is_refused_before_any_tensor_is_copied(source):
    _, checkpoint = source
    other = build_tiny_llama(seed=1)  # same architecture, other weights; not frozen: the loader freezes it first
    with pytest.raises(ValueError) as err:
        load_checkpoint_adapter(other, checkpoint, "last.ckpt", remedy="pass the model it was trained with")
    message = str(err.value)
    assert message.startswith("checkpoint last.ckpt does not belong to this base model: it was written for a base ")
    assert "other weights" in message and message.endswith("; pass the model it was trained with")
    assert "\n" not in message
    assert all(not layer.lora_B.any() for _, layer in lora_modules(other))  # nothing copied


def test_quantization_is_compared_unless_the_base_is_the_original_weights(source):
    _, checkpoint = source
    saved = {**checkpoint, CHECKPOINT_KEY: {**checkpoint[CHECKPOINT_KEY]}}
    saved[CHECKPOINT_KEY]["base"] = {**saved[CHECKPOINT_KEY]["base"], "quantization": {"quant_type": "nf4"}}
    with pytest.raises(ValueError, match="trained with quantization .*nf4.* but this run uses none"):
        load_checkpoint_adapter(build_tiny_llama(), saved, "last.ckpt")
    load_checkpoint_adapter(build_tiny_llama(), saved, "last.ckpt", compare_quantization=False)


def bad(checkpoint: dict, **meta) -> dict:
    return {**checkpoint, CHECKPOINT_KEY: {**checkpoint[CHECKPOINT_KEY], **meta}}


BAD = {
    "no metadata": (lambda c: {"state_dict": c["state_dict"]}, "has no LoRA adapter settings"),
    "no tensors": (lambda c: {**c, "state_dict": {}}, "holds no adapter tensors"),
    "tensors of other layers": (
        lambda c: bad(c, lora={**LORA.to_dict(), "target_modules": ["q_proj"]}),
        "has tensors this model lacks (e.g. model.model.layers.0.self_attn.k_proj.lora_A",
    ),
    "another rank": (lambda c: bad(c, lora={**LORA.to_dict(), "r": 8}), "is (4, 64) there and (8, 64) here"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_checkpoint_is_one_line(case, source):
    make, expected = BAD[case]
    with pytest.raises(ValueError) as err:
        load_checkpoint_adapter(build_tiny_llama(), make(source[1]), "last.ckpt")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_adapter_kind_names_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist; pass a PEFT adapter folder"):
        adapter_kind(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="folder without adapter_config.json; .*such as .*last.ckpt"):
        adapter_kind(tmp_path / "run")
    assert adapter_kind(tmp_path / "run" / "last.ckpt") == "checkpoint"


def test_a_sharded_checkpoint_folder_is_named_as_such(tmp_path):
    """FSDP's default checkpoint is a folder (torch.distributed.checkpoint): say so, not 'no adapter_config.json'."""
    from lightning_qlora.lora.loading import adapter_kind

    folder = tmp_path / "epoch=0-step=10.ckpt"
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"")
    (folder / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a sharded \(FSDP\) checkpoint") as err:
        adapter_kind(folder)
    assert "\n" not in str(err.value) and "state_dict_type='full'" in str(err.value)
