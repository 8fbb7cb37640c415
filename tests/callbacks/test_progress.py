"""QLoRAProgressBar: steps out of max_steps with loss and tokens/s; RunSummary puts it in place of the stock bar and
keeps Lightning's own deprecation warnings out of a QLoRA run's output."""

import logging
import re
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader

from lightning_qlora import LoRA, NF4Precision, PagedOptimizerStrategy, QLoRAProgressBar, RunSummary
from lightning_qlora.callbacks.progress import QuietLightningInternals, count_tokens, use_qlora_progress_bar
from lightning_qlora.models.causal_lm import CausalLM

PAD = 3


def _batches(n, shape=(2, 12), pad=4):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 512, shape, generator=gen)
        mask = torch.ones(shape, dtype=torch.long)
        mask[:, -pad:] = 0  # right padding: not counted as tokens
        ids[mask == 0] = PAD
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _trainer(root, callbacks, max_steps, **kwargs):
    kwargs = {
        "default_root_dir": root,
        "plugins": [NF4Precision()],
        "strategy": PagedOptimizerStrategy(),
        "callbacks": callbacks,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return L.Trainer(**kwargs)


def _bar_text(out: str) -> list[str]:
    """What a terminal shows, one entry per redraw of a bar."""
    return [part.strip() for part in re.split(r"[\r\n]", out) if part.strip()]


def test_bar_counts_steps_to_max_steps_and_shows_loss_and_tokens_per_second(tiny_llama_dir, tmp_path, capsys):
    module = CausalLM(model=str(tiny_llama_dir), lr=1e-3)
    bar = QLoRAProgressBar()
    trainer = _trainer(tmp_path, [LoRA(r=4), bar], max_steps=5)
    trainer.fit(module, DataLoader(_batches(3), batch_size=None))  # 5 steps over 2 epochs of 3 batches
    assert trainer.global_step == 5 and trainer.current_epoch >= 1
    lines = _bar_text(capsys.readouterr().out)
    train = [line for line in lines if line.startswith("step ")]
    for step in range(1, 6):
        assert any(line.startswith(f"step {step}/5:") for line in train), train
    final = train[-1]
    assert final.startswith("step 5/5: 100%"), final
    assert re.search(r"train_loss=\d", final) and re.search(r"tok/s=\d+", final), final
    assert "Epoch" not in "".join(lines) and "/-2" not in "".join(lines) and "v_num" not in final
    assert bar.tokens_per_sec is not None and bar.tokens_per_sec > 0
    assert all(count == 2 * 8 for count, _ in bar._batches)  # 12 positions, 4 of them padding, per row


def test_bar_without_max_steps_counts_batches_per_epoch(tiny_llama_dir, tmp_path, capsys):
    module = CausalLM(model=str(tiny_llama_dir), lr=1e-3)
    trainer = _trainer(tmp_path, [LoRA(r=4), QLoRAProgressBar()], max_steps=-1, max_epochs=2)
    trainer.fit(module, DataLoader(_batches(2), batch_size=None))
    lines = _bar_text(capsys.readouterr().out)
    assert any(line.startswith("epoch 2/2: 100%") and "2/2" in line for line in lines), lines


def test_run_summary_swaps_the_stock_bar_and_leaves_others(tmp_path):
    for stock in (TQDMProgressBar, RichProgressBar):
        trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[stock()], logger=False)
        bar = use_qlora_progress_bar(trainer)
        assert isinstance(bar, QLoRAProgressBar) and trainer.progress_bar_callback is bar
        assert sum(isinstance(c, TQDMProgressBar | RichProgressBar) for c in trainer.callbacks) == 1

    class Mine(TQDMProgressBar):
        pass

    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[Mine()], logger=False)
    assert use_qlora_progress_bar(trainer) is None and type(trainer.progress_bar_callback) is Mine
    trainer = L.Trainer(default_root_dir=tmp_path, enable_progress_bar=False, logger=False)
    assert use_qlora_progress_bar(trainer) is None and trainer.progress_bar_callback is None


def test_count_tokens_uses_the_attention_mask():
    ids = torch.ones(2, 5, dtype=torch.long)
    assert count_tokens({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5])}) == 8
    assert count_tokens({"input_ids": ids}) == 10 and count_tokens(ids) == 10 and count_tokens([1]) == 0


def test_quiet_lightning_internals_filters_only_lightnings_own_warning_and_only_while_entered():
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    quiet = QuietLightningInternals()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.enter()
        quiet.enter()  # once
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(message, FutureWarning, "mine.py", 1, module="my_project.trees")  # not Lightning's
        quiet.exit()
        quiet.exit()
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
    assert [w.filename for w in seen] == ["mine.py", "_pytree.py"]


UNACTIONABLE = (
    "not supported by the model summary",  # Lightning pricing "nf4-dq" at 32 bits
    "LeafSpec",  # Lightning's own use of a deprecated torch class
    "gemm_4bit_forward",  # bitsandbytes' optional CPU hub kernel
    "GGUF",  # transformers asked for packed GGUF weights in bf16
)


def _demo_like_fit(model_dir, root, callbacks):
    module = CausalLM(model=str(model_dir), lr=1e-3)
    trainer = _trainer(
        root, [LoRA(r=4), *callbacks], max_steps=4, val_check_interval=2, num_sanity_val_steps=-1,
        enable_model_summary=True, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, DataLoader(_batches(4), batch_size=None), DataLoader(_batches(2), batch_size=None))
    return trainer


def test_demo_like_fit_shows_no_warning_a_user_cannot_act_on(tiny_llama_dir, tmp_path, recwarn, caplog, capsys):
    with caplog.at_level(logging.INFO):
        trainer = _demo_like_fit(tiny_llama_dir, tmp_path, [RunSummary(log_every_n_steps=1)])
    assert trainer.global_step == 4 and isinstance(trainer.progress_bar_callback, QLoRAProgressBar)
    out = capsys.readouterr()
    text = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records] + [out.out, out.err]
    assert not [t for t in text for needle in UNACTIONABLE if needle in t], [str(w.message) for w in recwarn]
    assert "Total estimated model params size (MB)" in out.out + caplog.text
    assert "step 4/4" in out.out and "tok/s=" in out.out


def test_without_run_summary_lightning_still_warns(tiny_llama_dir, tmp_path, recwarn):
    """The control for the test above: without RunSummary, Lightning's internal deprecation shows."""
    _demo_like_fit(tiny_llama_dir, tmp_path, [])
    messages = [str(w.message) for w in recwarn]
    assert any("LeafSpec" in m for m in messages), messages
    assert not any("not supported by the model summary" in m for m in messages)  # NF4Precision alone fixes that
