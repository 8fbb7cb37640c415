import json

import lightning as L
import pytest
import torch

from lightning_qlora import CausalLM, InstructionDataModule, LoRA, NF4Precision, PagedOptimizerStrategy
from lightning_qlora.quantization.nf4 import is_4bit_linear


def write_rows(path, n=24):
    facts = [("What colour is the sky?", "Blue."), ("What is two plus two?", "Four."), ("Name a cat sound.", "Meow.")]
    with open(path, "w") as f:
        for i in range(n):
            q, a = facts[i % len(facts)]
            f.write(json.dumps({"instruction": q, "input": "", "output": a}) + "\n")
    return path


def test_causal_lm_trains_with_quantize_on_load(tiny_llama_dir, tmp_path):
    module = CausalLM(model=str(tiny_llama_dir), dtype="fp32", lr=5e-3)
    data = InstructionDataModule(
        path=str(write_rows(tmp_path / "rows.jsonl")), max_length=64, batch_size=4, val_split=4
    )
    trainer = L.Trainer(
        plugins=[NF4Precision(compute_dtype="bf16")],
        callbacks=[LoRA(r=8, alpha=16, dropout=0.0)],
        strategy=PagedOptimizerStrategy(),
        max_steps=15,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert sum(is_4bit_linear(m) for m in module.model.modules()) == 14
    assert module.tokenizer.pad_token is not None
    losses = [v for _, v in module.val_history]
    assert module.val_history[0][0] == 0 and len(losses) >= 3
    assert losses[-1] < losses[0] - 0.5, losses
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-3)  # constant schedule


def test_configure_optimizers_defaults_are_the_papers(tiny_llama_dir):
    module = CausalLM(model=str(tiny_llama_dir))
    module.configure_model()
    for p in module.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        module.configure_optimizers()
    module.model.lm_head.weight.requires_grad_(True)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 2e-4
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 2e-4


def test_warmup_then_constant(tiny_llama_dir):
    module = CausalLM(model=str(tiny_llama_dir), warmup_steps=3, lr=1e-3)
    module.configure_model()
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


# ------------------------------------------------------------------------------------------ chunked loss
def _batch(pad: bool = True):
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -3:] = 0
        labels[1, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_chunked_loss_is_the_default_and_matches_the_models_own_loss(tiny_llama_dir):
    assert CausalLM(model=str(tiny_llama_dir)).hparams.loss_chunk_size == 4096
    module = CausalLM(model=str(tiny_llama_dir), dtype="fp32", loss_chunk_size=8)
    module.configure_model()
    batch = _batch()
    head = module.model.lm_head.weight.requires_grad_(True)
    ours, tokens = module._loss(batch)
    (ours_grad,) = torch.autograd.grad(ours, head)
    module.hparams.loss_chunk_size = None
    theirs, tokens_hf = module._loss(batch)
    (their_grad,) = torch.autograd.grad(theirs, head)
    assert int(tokens) == int(tokens_hf) == 2 * 15 - 3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grad, their_grad, rtol=1e-4, atol=1e-6)
    direct = module.model(**batch).loss
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-5)


def test_models_that_post_process_logits_fall_back_with_a_warning(tiny_llama_dir):
    module = CausalLM(model=str(tiny_llama_dir), dtype="fp32", loss_chunk_size=8)
    module.configure_model()
    module.model.config.final_logit_softcapping = 30.0  # what Gemma 2 does after its head
    batch = _batch(pad=False)
    with pytest.warns(UserWarning, match=r"loss_chunk_size=8 ignored.*final_logit_softcapping=30.0"):
        loss, _ = module._loss(batch)
    assert torch.equal(loss, module.model(**batch).loss)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_loss_chunk_size_is_a_one_line_error(tiny_llama_dir, bad):
    with pytest.raises(ValueError, match=rf"loss_chunk_size={bad!r}.*positive int") as err:
        CausalLM(model=str(tiny_llama_dir), loss_chunk_size=bad)
    assert "\n" not in str(err.value)


def test_a_tokenizer_with_more_tokens_than_the_model_has_embeddings_is_refused_in_one_line(tiny_llama_dir, tmp_path):
    """Another model's tokenizer: one line naming both sizes when the model is built, not an IndexError mid-step."""
    from conftest import build_tiny_llama

    build_tiny_llama(vocab_size=256).save_pretrained(tmp_path / "small")
    module = CausalLM(str(tmp_path / "small"), tokenizer=str(tiny_llama_dir), dtype="fp32")
    assert len(module.tokenizer) > 256
    with pytest.raises(ValueError) as err:
        module.configure_model()
    assert str(err.value).startswith(
        f"the tokenizer has {len(module.tokenizer)} tokens but the model has embeddings for 256: it is another model's"
    )
