"""PreferenceLM: the reference is the 4-bit base with adapters off (bit for bit), and a short NF4 + LoRA fit learns."""

from __future__ import annotations

import json
import math
import re

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from transformers import GenerationMixin

from lightning_qlora import LoRA, NF4Precision, NonFiniteGuard, PagedOptimizerStrategy, PreferenceDataModule
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, mark_only_lora_trainable
from lightning_qlora.models.preference import PreferenceLM, model_sequence_logps
from lightning_qlora.models.sources import load_causal_lm
from lightning_qlora.quantization.nf4 import is_4bit_linear
from lightning_qlora.utils.finite import NonFiniteError

TOPICS = ["the sky", "a fox", "the dog", "a cat", "the log", "birds", "the mat", "winter"]


def write_pairs(path, n: int = 24):
    """A separable set: the chosen answer is always on topic, the rejected one always the same off-topic line."""
    topics = [TOPICS[i % len(TOPICS)] for i in range(n)]
    rows = [{"prompt": f"Question {i}: what about {topic}?", "chosen": f"Answer: {topic} is fine.",
             "rejected": "Z Y X W V U T."} for i, topic in enumerate(topics)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def fitted(tiny_llama_dir, tmp_path_factory):
    """One DPO fit through NF4Precision + LoRA + PagedOptimizerStrategy, as users run it."""
    tmp = tmp_path_factory.mktemp("dpo_fit")
    module = PreferenceLM(model=str(tiny_llama_dir), method="dpo", beta=0.5, dtype="fp32", lr=1e-2)
    data = PreferenceDataModule(str(write_pairs(tmp / "pairs.jsonl")), max_length=64, batch_size=4, val_split=8)
    trainer = L.Trainer(
        plugins=[NF4Precision(compute_dtype="fp32")],
        callbacks=[LoRA(r=8, alpha=16, dropout=0.0, export_dir=str(tmp / "adapter")), NonFiniteGuard()],
        strategy=PagedOptimizerStrategy(),
        max_steps=8, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp,
    )  # fmt: skip
    trainer.fit(module, data)
    return module, trainer, data, tmp


def test_dpo_fit_raises_held_out_accuracy_and_margins(fitted):
    module, trainer, _, tmp = fitted
    history = [values for _, values in module.preference_history]
    assert [step for step, _ in module.preference_history] == [0, 4, 8]
    first, last = history[0], history[-1]
    assert first["margins"] == 0.0 and first["accuracies"] == 0.0  # before training the policy is the reference
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert last["accuracies"] == 1.0 and last["margins"] > 0.5 and last["loss"] < 0.5 * first["loss"], history
    assert [loss for _, loss in module.val_history] == [values["loss"] for values in history]
    for key in ("train_loss", "train_rewards/margins", "train_rewards/accuracies", "val_rewards/chosen", "val_loss"):
        assert key in trainer.callback_metrics, key
    assert (tmp / "adapter" / "adapter_config.json").is_file()  # the PEFT export still works
    assert sum(is_4bit_linear(m) for m in module.model.modules()) == 14


def test_one_model_in_memory(fitted):
    module = fitted[0]
    assert [m for m in module.modules() if isinstance(m, GenerationMixin)] == [module.model]
    assert sum(isinstance(m, torch.nn.Embedding) for m in module.modules()) == 1
    assert {id(p) for p in module.parameters()} == {id(p) for p in module.model.parameters()}
    assert sum(is_4bit_linear(m) for m in module.modules()) == 14  # 2 layers x 7 linears: one base, no copy


def test_reference_logps_equal_a_separately_loaded_base_bit_for_bit(fitted, tiny_llama_dir):
    module, trainer, data, _ = fitted
    base = load_causal_lm(tiny_llama_dir, quantization=trainer.precision_plugin.config, dtype=torch.float32)
    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        reference = module.reference_logps(batch)
        policy = model_sequence_logps(module.model, batch["input_ids"], batch["labels"], batch["attention_mask"])[0]
        separate = model_sequence_logps(base.eval(), batch["input_ids"], batch["labels"], batch["attention_mask"])[0]
    assert torch.equal(reference, separate)
    assert not torch.allclose(policy, reference)  # the adapters did move: the reference is not the policy


@pytest.mark.parametrize("method", ["ipo", "orpo"])
def test_ipo_and_orpo_steps_train_the_adapters(tiny_llama_dir, tmp_path, method):
    module = PreferenceLM(model=str(tiny_llama_dir), method=method, dtype="fp32")
    module.configure_model()
    inject_lora(module.model, LoRAConfig(r=4, dropout=0.0))
    mark_only_lora_trainable(module.model)
    data = PreferenceDataModule(str(write_pairs(tmp_path / "pairs.jsonl", 6)), val_split=2, batch_size=2)
    data.connect(module.tokenizer).setup()
    out, tokens = module.preference_step(next(iter(data.train_dataloader())))
    out.loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads) and int(tokens) > 0
    if method == "orpo":
        assert out.loss > 0 and torch.isfinite(out.chosen_rewards).all()
    else:  # B = 0: the policy is the reference, so IPO's loss is (0 - 1/(2β))²
        assert float(out.loss.detach()) == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)


def test_dpo_needs_adapters_and_bad_arguments_are_one_line_errors(tiny_llama_dir, tmp_path):
    module = PreferenceLM(model=str(tiny_llama_dir), dtype="fp32")
    module.configure_model()
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="needs LoRA adapters") as err:
        module.preference_step(batch)
    assert "\n" not in str(err.value)
    for kwargs, fragment in (({"method": "kto"}, "use one of dpo, ipo, orpo"), ({"beta": 0}, "positive"),
                             ({"label_smoothing": 0.5}, "in [0, 0.5)"),
                             ({"method": "ipo", "label_smoothing": 0.1}, "DPO's flip rate")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(fragment)):
            PreferenceLM(model=str(tiny_llama_dir), **kwargs)


def test_peft_export_of_a_dpo_run_is_the_policy_and_peft_without_it_is_the_reference(fitted, tiny_llama_dir):
    """The exported adapter loaded by peft on the same 4-bit base scores as the policy; disabled, as the reference."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from lightning_qlora.lora.layer import lora_state_dict

    module, trainer, data, tmp = fitted
    exported = load_file(tmp / "adapter" / "adapter_model.safetensors")
    ours = lora_state_dict(module)
    assert len(exported) == len(ours) == 28
    for key, value in ours.items():  # exactly the trained adapters, under peft's names
        assert torch.equal(exported["base_model.model." + key.removeprefix("model.") + ".weight"], value), key
    base = load_causal_lm(tiny_llama_dir, quantization=trainer.precision_plugin.config, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp / "adapter")).eval()
    batch = next(iter(data.val_dataloader()))
    module.eval()
    args = (batch["input_ids"], batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        policy = model_sequence_logps(module.model, *args, chunk_size=None)[0]
        reference = module.reference_logps(batch)
        peft_policy = model_sequence_logps(theirs, *args, chunk_size=None)[0]
        with theirs.disable_adapter():
            peft_reference = model_sequence_logps(theirs, *args, chunk_size=None)[0]
    torch.testing.assert_close(peft_policy, policy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(peft_reference, reference, atol=1e-4, rtol=1e-5)
    assert (policy - reference).abs().min() > 1e-2  # the two differ: the check tells them apart


def test_nan_from_the_reference_pass_stops_the_run_naming_the_pair(tiny_llama_dir, tmp_path):
    """A NaN reference log-probability (no-grad pass, adapters off) reaches the loss; NonFiniteGuard names the pair."""

    class NaNReference(PreferenceLM):
        poisoned: str = ""

        def reference_logps(self, batch):
            reference = super().reference_logps(batch)
            if self.trainer.training and self.global_step == 1:  # pair 0 of step 1: its chosen and rejected rows
                self.poisoned = self.trainer.datamodule.describe_rows(batch["row_index"][:1].tolist())[0]
                pairs = reference.size(0) // 2
                reference = reference.clone()
                reference[[0, pairs]] = float("nan")
            return reference

    module = NaNReference(model=str(tiny_llama_dir), method="dpo", dtype="fp32", lr=1e-2)
    data = PreferenceDataModule(str(write_pairs(tmp_path / "pairs.jsonl", 12)), max_length=64, batch_size=2,
                                val_split=2)  # fmt: skip
    export = tmp_path / "adapter"
    trainer = quiet_trainer(tmp_path, [LoRA(r=8, dropout=0.0, export_dir=str(export)), NonFiniteGuard()], 3)
    with pytest.raises(NonFiniteError) as err:
        trainer.fit(module, data)
    message = str(err.value)
    assert "\n" not in message and message.startswith("non-finite loss (nan) at step 1 (epoch 0, batch 1; rows ")
    assert module.poisoned.startswith(f"{tmp_path / 'pairs.jsonl'} line ") and f"rows {module.poisoned}, " in message
    assert not export.exists()  # nothing exported from the stopped run


def test_lm_eval_callback_scores_the_policy_during_a_dpo_fit(tiny_llama_dir, tmp_path, monkeypatch):
    """LMEvalCallback on a PreferenceLM: step 0 scores the 4-bit base (B = 0), step 2 the policy as trained."""
    import lm_eval.evaluator

    from lightning_qlora.evaluation import DEMO_TASK, LMEvalCallback
    from lightning_qlora.evaluation.run import evaluate

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # `pip list`: not checked here
    settings = dict(num_fewshot=0, limit=4, batch_size=4)
    callback = LMEvalCallback(tasks=[DEMO_TASK], every_n_train_steps=2, on_fit_start=True, **settings)
    module = PreferenceLM(model=str(tiny_llama_dir), method="dpo", beta=0.5, dtype="fp32", lr=5e-2)
    data = PreferenceDataModule(str(write_pairs(tmp_path / "pairs.jsonl", 12)), max_length=64, batch_size=2,
                                val_split=2)  # fmt: skip
    trainer = L.Trainer(
        plugins=[NF4Precision(compute_dtype="fp32")], callbacks=[LoRA(r=8, alpha=16, dropout=0.0), callback],
        strategy=PagedOptimizerStrategy(), max_steps=2, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert [step for step, _ in callback.history] == [0, 2]
    names = [f"lm_eval/{DEMO_TASK}/{m}" for m in ("acc", "acc_norm")]
    base = load_causal_lm(tiny_llama_dir, quantization=trainer.precision_plugin.config, dtype=torch.float32)
    before = evaluate(base, [DEMO_TASK], tokenizer=module.tokenizer, **settings)["results"][DEMO_TASK]
    assert [callback.history[0][1][n] for n in names] == [before["acc,none"], before["acc_norm,none"]]
    after = evaluate(module, [DEMO_TASK], **settings)["results"][DEMO_TASK]  # the live policy after step 2
    assert [callback.history[1][1][n] for n in names] == [after["acc,none"], after["acc_norm,none"]]
    assert any(float(p.detach().abs().max()) > 0 for n, p in module.named_parameters() if n.endswith("lora_B"))


def test_dpo_refuses_modules_trained_outside_the_adapters(tiny_llama_dir, tmp_path):
    """A trained head would stay trained with the adapters off: the reference would not be the base."""
    module = PreferenceLM(model=str(tiny_llama_dir), method="dpo", dtype="fp32")
    data = PreferenceDataModule(str(write_pairs(tmp_path / "pairs.jsonl", 6)), val_split=2, batch_size=2)
    trainer = quiet_trainer(tmp_path, [LoRA(r=4, trainable_modules=["lm_head"])], max_steps=1)
    with pytest.raises(ValueError, match=r"trains lm_head.weight outside the adapters") as err:
        trainer.fit(module, data)
    assert "\n" not in str(err.value) and "method='orpo'" in str(err.value)
    assert trainer.global_step == 0


def test_policy_equals_reference_at_b_zero_for_a_bf16_model_computed_in_fp32(tiny_llama_dir):
    """The policy (fused, gradients on) and the reference (adapters off, no grad) dequantize the same way."""
    from lightning_qlora.lora.layer import adapters_disabled
    from lightning_qlora.quantization.nf4 import QuantizationConfig

    config = QuantizationConfig(compute_dtype=torch.float32)
    model = load_causal_lm(tiny_llama_dir, quantization=config, dtype=torch.bfloat16).train()
    inject_lora(model, LoRAConfig(r=8, dropout=0.0))
    mark_only_lora_trainable(model)
    ids = torch.randint(3, 500, (4, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    policy = model_sequence_logps(model, ids, labels)[0]
    assert policy.requires_grad
    with torch.no_grad(), adapters_disabled(model):
        reference = model_sequence_logps(model, ids, labels)[0]
    assert torch.equal(policy.detach(), reference)  # a bf16-rounded W0 in one of them was 5e-2 off per sequence


def test_dpo_after_sft_starts_from_the_merged_sft_model(tiny_llama_dir, tmp_path, capsys):
    """SFT adapter -> ``lightning-qlora export --format safetensors`` -> DPO on that folder: the reference is the SFT
    model (its merged weights in 4 bits), not the original base."""
    from transformers import AutoModelForCausalLM

    from lightning_qlora.cli.main import main
    from lightning_qlora.lora.layer import lora_modules
    from lightning_qlora.lora.peft_format import export_peft

    sft = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0)
    inject_lora(sft, config)
    with torch.no_grad():
        for _, layer in lora_modules(sft):
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    export_peft(sft, tmp_path / "sft", config, base_model_name_or_path=str(tiny_llama_dir))
    main(["export", "--format", "safetensors", "--adapter", str(tmp_path / "sft"), "--model", str(tiny_llama_dir),
          "--dtype", "fp32", "--out", str(tmp_path / "merged")])  # fmt: skip
    module = PreferenceLM(model=str(tmp_path / "merged"), method="dpo", dtype="fp32")
    data = PreferenceDataModule(str(write_pairs(tmp_path / "pairs.jsonl", 8)), max_length=64, batch_size=4, val_split=4)
    trainer = L.Trainer(
        plugins=[NF4Precision(compute_dtype="fp32")], strategy=PagedOptimizerStrategy(),
        callbacks=[LoRA(r=4, alpha=8, dropout=0.0, export_dir=str(tmp_path / "dpo"))], max_steps=1,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert (tmp_path / "dpo" / "adapter_config.json").is_file()
    quantization = trainer.precision_plugin.config
    merged = load_causal_lm(tmp_path / "merged", quantization=quantization, dtype=torch.float32).eval()
    original = load_causal_lm(tiny_llama_dir, quantization=quantization, dtype=torch.float32).eval()
    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        reference = module.reference_logps(batch)
        args = (batch["input_ids"], batch["labels"], batch["attention_mask"])
        assert torch.equal(reference, model_sequence_logps(merged, *args)[0])
        assert not torch.allclose(reference, model_sequence_logps(original, *args)[0], atol=1e-2)
