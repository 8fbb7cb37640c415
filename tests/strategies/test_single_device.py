"""PagedOptimizerStrategy: the bitsandbytes optimizer keeps the user's hyperparameters, groups and schedulers."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora import LoRA, PagedOptimizerStrategy
from lightning_qlora.optim.paged import (
    build_optimizer,
    convert_optimizer,
    optimizer_class,
    optimizer_state_bytes,
    retarget_schedulers,
)

ADAPTERS = {f"net.{layer}.lora_{m}" for layer in ("fc1", "fc2") for m in "AB"}


def loader(n=16):
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 64, generator=gen), torch.randn(n, 64, generator=gen)), batch_size=4)


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyMLP()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)


class WithGroupsAndScheduler(Regression):
    def configure_optimizers(self):
        named = dict(self.named_parameters())
        groups = [
            {"params": [named["net.fc1.lora_A"], named["net.fc1.lora_B"]], "lr": 1e-3},
            {"params": [named["net.output.weight"], named["net.output.bias"]], "lr": 5e-3},  # frozen: left empty
            {"params": [named["net.fc2.lora_A"], named["net.fc2.lora_B"]], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=2e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LrRecorder(L.Callback):
    def __init__(self):
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def fit(module, strategy, steps=4, callbacks=()):
    trainer = L.Trainer(
        strategy=strategy,
        callbacks=[LoRA(r=4, alpha=8, dropout=0.0), *callbacks],
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader())
    return trainer


def paged_warnings(caught) -> list:
    return [w for w in caught if "paged optimizers need CUDA" in str(w.message)]


def scheduler_warnings(caught) -> list:
    """torch's step-order warnings: "`optimizer.step()` has been overridden", "`lr_scheduler.step()` before"."""
    return [w for w in caught if "lr_scheduler" in str(w.message) or "optimizer.step()" in str(w.message)]


def test_wraps_configure_optimizers_keeping_groups_hyperparameters_and_scheduler():
    module, strategy, recorder = WithGroupsAndScheduler(), PagedOptimizerStrategy(), LrRecorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module, strategy, steps=6, callbacks=[recorder])
    assert not scheduler_warnings(caught)
    assert len(paged_warnings(caught)) == 1  # one warning for the whole run, not one per step

    optimizer = trainer.optimizers[0]
    assert type(optimizer) is bnb.optim.AdamW32bit  # CPU: the unpaged equivalent of PagedAdamW32bit
    groups = optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [2, 0, 2]
    assert [g["initial_lr"] for g in groups] == [1e-3, 5e-3, 2e-3]
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]

    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is optimizer
    expected = [[base / (1 + step) for base in (1e-3, 5e-3, 2e-3)] for step in range(6)]
    assert len(recorder.lrs) == 6  # the scheduler drives the new optimizer's lr
    for seen, wanted in zip(recorder.lrs, expected):
        assert seen == pytest.approx(wanted)
    assert [g["lr"] for g in groups] == pytest.approx([base / 7 for base in (1e-3, 5e-3, 2e-3)])

    names = {id(p): n for n, p in module.named_parameters()}
    assert {names[id(p)] for p in optimizer.state} == ADAPTERS  # only trainable parameters have state
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    assert strategy.optimizer_state_bytes() == optimizer_state_bytes(optimizer) == state_bytes
    adapters = sum(p.numel() for n, p in module.named_parameters() if n in ADAPTERS)
    assert state_bytes == 2 * 4 * adapters  # two fp32 moments per adapter weight
    assert strategy.trainable_parameter_count() == adapters


@pytest.mark.parametrize("name, cls", [("adamw_8bit", bnb.optim.AdamW8bit), ("paged_lion_32bit", bnb.optim.Lion32bit)])
def test_builds_the_named_optimizer_without_configure_optimizers(name, cls):
    module = Regression()
    strategy = PagedOptimizerStrategy(optimizer=name, optimizer_kwargs={"lr": 1e-3, "weight_decay": 0.05})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module, strategy, steps=8)
    assert len(paged_warnings(caught)) == 1
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is cls
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 0.05
    names = {id(p): n for n, p in module.named_parameters()}
    assert {names[id(p)] for g in optimizer.param_groups for p in g["params"]} == ADAPTERS
    assert {names[id(p)] for p in optimizer.state} == ADAPTERS
    assert strategy.optimizer_state_bytes() > 0
    assert module.net.fc1.lora_B.abs().sum() > 0


def test_paged_classes_are_chosen_by_name():
    assert optimizer_class("paged_adamw_32bit", paged=True) is bnb.optim.PagedAdamW32bit
    assert optimizer_class("paged_adamw_32bit", paged=False) is bnb.optim.AdamW32bit
    assert optimizer_class("Paged-AdamW-8bit", paged=True) is bnb.optim.PagedAdamW8bit
    assert PagedOptimizerStrategy().root_device == torch.device("cpu")
    assert not PagedOptimizerStrategy().paged


def test_unknown_optimizer_name_is_a_one_line_error_with_close_matches():
    with pytest.raises(ValueError) as err:
        PagedOptimizerStrategy(optimizer="paged_adamw_23bit")
    message = str(err.value)
    assert "\n" not in message
    assert "unknown optimizer 'paged_adamw_23bit'" in message and "did you mean paged_adamw_32bit" in message
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; known: paged_adamw_32bit"):
        PagedOptimizerStrategy(optimizer="sgd")


def _reference_run(bnb_name: str, torch_cls, steps=6, **hyper):
    """The same parameters and gradients through a bitsandbytes optimizer and its torch counterpart."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=gen), torch.randn(96, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(steps)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    frozen = torch.nn.Parameter(torch.randn(8), requires_grad=False)
    ours_opt = build_optimizer(bnb_name, [*ours, frozen], paged=False, **hyper)
    theirs_opt = torch_cls(theirs, **hyper)
    for step_grads in grads:
        for params, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
    assert frozen not in ours_opt.state
    return ours, theirs


@pytest.mark.parametrize(
    "bnb_name, torch_cls, weight_decay",
    [
        ("adamw_32bit", torch.optim.AdamW, 0.1),
        ("paged_adamw_32bit", torch.optim.AdamW, 0.0),
        ("paged_adam_32bit", torch.optim.Adam, 0.0),
        ("paged_adam_32bit", torch.optim.AdamW, 0.1),  # bitsandbytes' Adam decays weights decoupled, as AdamW
    ],
)
def test_bitsandbytes_math_matches_torch(bnb_name, torch_cls, weight_decay):
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    ours, theirs = _reference_run(bnb_name, torch_cls, **hyper)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_converting_adam_with_l2_weight_decay_warns_that_the_math_changes():
    params = [torch.nn.Parameter(torch.randn(64, 64))]
    with pytest.warns(UserWarning, match="L2 term added to the gradient.*decoupled"):
        convert_optimizer(torch.optim.Adam(params, weight_decay=0.1), "paged_adamw_32bit", paged=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_optimizer(torch.optim.Adam(params), "paged_adamw_32bit", paged=False)
        convert_optimizer(torch.optim.AdamW(params, weight_decay=0.1), "paged_adamw_32bit", paged=False)


def test_convert_optimizer_keeps_a_torch_optimizers_settings():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64), requires_grad=False)]
    converted = convert_optimizer(torch.optim.Adam(params, lr=3e-4, betas=(0.5, 0.6)), "paged_adamw_8bit", paged=False)
    assert type(converted) is bnb.optim.Adam8bit  # Adam stays Adam; the default's bit width is kept
    assert converted.param_groups[0]["lr"] == 3e-4 and converted.param_groups[0]["betas"] == (0.5, 0.6)
    assert [p for g in converted.param_groups for p in g["params"]] == [params[0]]
    with pytest.raises(ValueError, match="no trainable parameters"):
        convert_optimizer(torch.optim.AdamW([params[1]]), "paged_adamw_32bit", paged=False)


SCHEDULES = {
    "lambda_warmup": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4)),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "sequential": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3),
            torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        ],
        milestones=[3],
    ),
    "chained": lambda opt: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.StepLR(opt, 2), torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)]
    ),
}


class Scheduled(Regression):
    def __init__(self, schedule: str, optimizer_cls=torch.optim.AdamW):
        super().__init__()
        self.schedule, self.optimizer_cls = schedule, optimizer_cls

    def configure_optimizers(self):
        optimizer = self.optimizer_cls([p for p in self.parameters() if p.requires_grad], lr=1e-2)
        scheduler = SCHEDULES[self.schedule](optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def torch_lrs(schedule: str, steps: int) -> tuple[list[float], float]:
    """The lr a plain torch AdamW sees before each of ``steps`` steps under ``schedule``, and the lr after them."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    scheduler = SCHEDULES[schedule](optimizer)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen, optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("schedule", ["lambda_warmup", "step"])
def test_converted_optimizer_follows_the_torch_schedule_step_for_step_without_warnings(schedule):
    recorder, steps = LrRecorder(), 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(Scheduled(schedule), PagedOptimizerStrategy(), steps=steps, callbacks=[recorder])
    assert not scheduler_warnings(caught)
    optimizer, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    assert type(optimizer) is bnb.optim.AdamW32bit and scheduler.optimizer is optimizer
    seen, final = torch_lrs(schedule, steps)
    assert [lrs[0] for lrs in recorder.lrs] == seen  # exactly torch's values, step for step
    assert optimizer.param_groups[0]["lr"] == final == scheduler.get_last_lr()[0]


def test_retargeted_scheduler_steps_the_new_optimizer_without_warnings():
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8), requires_grad=False)]
    old = torch.optim.AdamW(params, lr=1e-2)
    scheduler = SCHEDULES["lambda_warmup"](old)
    new = convert_optimizer(old, "adamw_32bit", paged=False)
    retarget_schedulers([type("Config", (), {"scheduler": scheduler})()], old, new)
    assert scheduler.optimizer is new and new.param_groups[0]["lr"] == old.param_groups[0]["lr"] == 2.5e-3
    seen, final = torch_lrs("lambda_warmup", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns if it cannot see that new.step() ran before scheduler.step()
        for want in seen:
            assert new.param_groups[0]["lr"] == want
            params[0].grad = torch.ones_like(params[0])
            new.step()
            scheduler.step()
    assert new.param_groups[0]["lr"] == final
    assert old.param_groups[0]["lr"] == 2.5e-3  # the torch optimizer is left alone
    retarget_schedulers([type("Config", (), {"scheduler": scheduler})()], new, new)  # already bitsandbytes: no-op


@pytest.mark.parametrize("schedule, name", [("sequential", "SequentialLR"), ("chained", "ChainedScheduler")])
def test_composite_schedulers_over_a_torch_optimizer_are_refused(schedule, name):
    with pytest.raises(ValueError, match=f"{name} cannot follow the optimizer to AdamW32bit.*one LambdaLR"):
        fit(Scheduled(schedule), PagedOptimizerStrategy(), steps=1)


def test_composite_scheduler_over_a_bitsandbytes_optimizer_is_used_as_is():
    recorder, steps = LrRecorder(), 6
    module = Scheduled("sequential", optimizer_cls=bnb.optim.AdamW32bit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module, PagedOptimizerStrategy(), steps=steps, callbacks=[recorder])
    assert not scheduler_warnings(caught)
    seen, final = torch_lrs("sequential", steps)
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(seen)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(final)


def test_resuming_restores_the_bitsandbytes_state_and_the_schedule(tmp_path):
    """Two epochs in one go equal one epoch, a checkpoint, and a resumed second epoch: lr, state and weights."""

    def run(epochs, ckpt_path=None):
        L.seed_everything(0)
        recorder = LrRecorder()
        trainer = L.Trainer(
            strategy=PagedOptimizerStrategy(),
            callbacks=[LoRA(r=4, alpha=8, dropout=0.0), recorder],
            max_epochs=epochs,
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Scheduled("lambda_warmup"), loader(), ckpt_path=ckpt_path)
        assert not scheduler_warnings(caught)
        return trainer, recorder.lrs

    whole, whole_lrs = run(2)
    first, first_lrs = run(1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, resumed_lrs = run(2, ckpt_path=tmp_path / "epoch1.ckpt")

    assert first_lrs + resumed_lrs == whole_lrs
    scheduler = resumed.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is resumed.optimizers[0]
    assert scheduler.state_dict() == whole.lr_scheduler_configs[0].scheduler.state_dict()
    a, b = whole.optimizers[0].state_dict(), resumed.optimizers[0].state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key in a["state"]:
        for name, value in a["state"][key].items():
            torch.testing.assert_close(value, b["state"][key][name], rtol=0, atol=0)
    resumed_params = dict(resumed.lightning_module.named_parameters())
    for name, param in whole.lightning_module.named_parameters():
        assert torch.equal(param, resumed_params[name]), name


def test_every_strategy_is_registered_under_its_short_name():
    import lightning as L
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_qlora

    for cls in (lightning_qlora.PagedOptimizerStrategy, lightning_qlora.PagedDDPStrategy,
                lightning_qlora.QLoRAFSDPStrategy, lightning_qlora.QLoRAFSDP2Strategy):  # fmt: skip
        assert StrategyRegistry[cls.strategy_name]["strategy"] is cls
    trainer = L.Trainer(strategy="paged_optimizer", accelerator="cpu", logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, lightning_qlora.PagedOptimizerStrategy)


@pytest.mark.parametrize("reuse", [True, False])
def test_cpu_training_keeps_freed_host_memory_unless_told_not_to(monkeypatch, reuse):
    import lightning_qlora.strategies.single_device as single_device

    calls = []
    monkeypatch.setattr(single_device, "keep_freed_host_memory", lambda: calls.append(1) or None)
    strategy = PagedOptimizerStrategy(reuse_host_memory=reuse)
    fit(Regression(), strategy, steps=1)
    assert calls == ([1] if reuse else [])
