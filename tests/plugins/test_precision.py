"""NF4Precision in Trainer.fit: whatever the order of quantization and LoRA injection, adapters stay full precision."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora import LoRA, NF4Precision
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.quantization.nf4_linear import NF4Linear


class Regression(L.LightningModule):
    def __init__(self, build_in_configure_model: bool = False):
        super().__init__()
        self.build_in_configure_model = build_in_configure_model
        self.net = None if build_in_configure_model else self._build()
        self.linear_types_at_build: list[type] = []

    @staticmethod
    def _build() -> nn.Module:
        torch.manual_seed(0)
        return TinyMLP()

    def configure_model(self):
        if self.net is None:
            self.net = self._build()
            self.linear_types_at_build = [type(m) for m in self.net.modules() if isinstance(m, nn.Linear)]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def loader():
    gen = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(16, 64, generator=gen), torch.randn(16, 64, generator=gen)), batch_size=8
    )


def fit(module, callbacks, plugins, steps=2):
    trainer = L.Trainer(
        plugins=plugins,
        callbacks=callbacks,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader())
    return trainer


def assert_adapters_full_precision_on_4bit_base(net: nn.Module) -> None:
    for name in ("fc1", "fc2"):
        layer = getattr(net, name)
        assert isinstance(layer, LoRALinear), name
        assert isinstance(layer.base_layer, NF4Linear), name
        for adapter in (layer.lora_A, layer.lora_B):
            assert type(adapter) is nn.Parameter and adapter.dtype == torch.float32 and adapter.requires_grad
        assert layer.lora_B.abs().sum() > 0  # trained
        assert not any(isinstance(m, NF4Linear) for m in (layer.lora_A, layer.lora_B))
    assert type(net.output) is nn.Linear and not net.output.weight.requires_grad
    assert sum(isinstance(m, NF4Linear) for m in net.modules()) == 2


ORDERS = ["callback-then-plugin", "lora-applied-first", "quantized-first", "built-in-configure_model"]


@pytest.mark.parametrize("order", ORDERS)
def test_adapters_are_never_quantized_whatever_the_order(order):
    lora = LoRA(r=4, alpha=8, dropout=0.0)
    module = Regression(build_in_configure_model=order == "built-in-configure_model")
    if order == "lora-applied-first":
        lora.apply(module)  # adapters exist before the plugin ever sees the model
        assert isinstance(module.net.fc1.base_layer, nn.Linear)
    elif order == "quantized-first":
        NF4Precision().convert_module(module)  # the base is 4-bit before LoRA is injected
        assert isinstance(module.net.fc1, NF4Linear)
    fit(module, [lora], [NF4Precision()])
    assert_adapters_full_precision_on_4bit_base(module.net)
    if order == "built-in-configure_model":  # under the plugin's init context the layers were empty 4-bit shells
        assert module.linear_types_at_build and all(issubclass(t, NF4Linear) for t in module.linear_types_at_build)


def test_callback_before_or_after_other_callbacks_gives_the_same_model():
    first, second = Regression(), Regression()
    fit(first, [LoRA(r=4, alpha=8, dropout=0.0), L.Callback()], [NF4Precision()])
    fit(second, [L.Callback(), LoRA(r=4, alpha=8, dropout=0.0)], [NF4Precision()])
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_" not in k)


class RawExperts(nn.Module):
    """A layer holding its matmul weights as raw parameters (as JetMoE's experts do): nothing can quantize it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.weight = nn.Parameter(torch.randn(4, 64, 64))
        self.scale = nn.Parameter(torch.ones(64, 16))  # not a matmul weight (as Mamba's A_log): not reported

    def forward(self, x):
        return self.proj(x) @ self.weight[0]


def test_full_precision_matrices_outside_any_known_layer_are_named_in_one_warning():
    model = RawExperts()
    with pytest.warns(UserWarning) as caught:
        plugin = NF4Precision(compute_dtype="fp32")
        plugin.convert_module(model)
    lines = [str(w.message) for w in caught if "stay in full precision" in str(w.message)]
    assert len(lines) == 1 and "1 weight matrices" in lines[0] and "e.g. weight of a RawExperts" in lines[0], lines
    assert plugin.footprint.matmul_share_4bit == pytest.approx(64 * 64 / (64 * 64 * 5))  # the share says so too
    kept = RawExperts()  # kept on purpose (skip_modules names the module): counted, not warned about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NF4Precision(skip_modules=["0"]).convert_module(nn.Sequential(kept))


def test_forward_context_autocasts_to_the_compute_dtype():
    plugin = NF4Precision(compute_dtype="fp16")
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        assert (torch.randn(2, 64) @ torch.randn(64, 2)).dtype == torch.float16
    with NF4Precision(autocast=False).forward_context():
        assert not torch.is_autocast_enabled("cpu")


def test_precision_state_refuses_other_settings_in_one_line():
    saved = NF4Precision().state_dict()
    NF4Precision().load_state_dict(saved)  # same settings: fine
    with pytest.raises(ValueError) as err:
        NF4Precision(double_quant=False).load_state_dict(saved)
    message = str(err.value)
    assert "\n" not in message and "'double_quant': True" in message and "same plugin settings" in message


def test_quantized_model_trains_only_adapters_and_outputs_change():
    module = Regression()
    reference = copy.deepcopy(module.net)
    fit(module, [LoRA(r=4, alpha=8, dropout=0.0)], [NF4Precision()], steps=4)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert not torch.equal(module.net(x), reference(x))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"net.{layer}.lora_{m}" for layer in ("fc1", "fc2") for m in "AB"}


@pytest.mark.parametrize("summary_cls", ["default", "ModelSummary", "RichModelSummary"])
def test_lightning_model_summary_shows_true_sizes(summary_cls, caplog, recwarn, capsys):
    import logging

    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary

    from lightning_qlora.memory.footprint import measure_footprint
    from lightning_qlora.plugins.model_summary import QuantizedSummary

    module = Regression()
    callbacks = [LoRA(r=4, alpha=8, dropout=0.0)]
    if summary_cls != "default":
        callbacks.append({"ModelSummary": ModelSummary, "RichModelSummary": RichModelSummary}[summary_cls]())
    trainer = L.Trainer(
        plugins=[NF4Precision()],
        callbacks=callbacks,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=True,
        enable_checkpointing=False,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(module, loader())
    assert not [w for w in recwarn if "not supported by the model summary" in str(w.message)]
    summaries = [cb for cb in trainer.callbacks if isinstance(cb, ModelSummary)]
    assert len(summaries) == 1
    summary = summaries[0]._summary(trainer, module)
    assert isinstance(summary, QuantizedSummary)
    fp = measure_footprint(module)
    dense = sum(p.numel() for p in Regression().parameters())  # the same network before quantization
    assert summary.total_parameters == dense + fp.adapter_params
    assert summary.total_parameters == fp.quantized_params + fp.unquantized_params + fp.adapter_params
    assert summary.trainable_parameters == fp.adapter_params
    assert summary.model_size == pytest.approx(fp.total_bytes / 1e6)
    assert sum(summary.param_nums) == summary.total_parameters  # the table's rows add up to the total
    text = caplog.text + capsys.readouterr().out
    assert "4-bit base params" in text and "Adapter params (trainable)" in text
    assert f"{fp.total_bytes / 1e6:,.3f}" in text  # the MB figure Lightning prints is the measured one


def test_a_summary_subclass_with_its_own_summary_is_left_alone():
    from lightning.pytorch.callbacks import ModelSummary

    from lightning_qlora.plugins.model_summary import show_true_sizes

    class Own(ModelSummary):
        def _summary(self, trainer, pl_module):
            return "mine"

    own, stock = Own(), ModelSummary()
    show_true_sizes([own, stock, L.Callback()])
    show_true_sizes([stock])  # idempotent
    assert own._summary(None, None) == "mine" and "_summary" not in vars(own)
    assert "_summary" in vars(stock)


def test_bitsandbytes_hub_kernel_note_is_dropped_only_during_our_import(caplog):
    import logging

    from lightning_qlora.utils.imports import _quiet_hub_kernel_probe

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    note = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip ..."
    with caplog.at_level(logging.WARNING):
        with _quiet_hub_kernel_probe():
            logger.warning(note, "No module named 'kernels'")
            logger.warning("another bitsandbytes warning")
        assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
        logger.warning(note, "x")  # outside our import: untouched
    assert len(caplog.records) == 2 and not logger.filters


_AVX512_BF16_CPU = """
import importlib.abc, importlib.machinery, sys

class PretendAvx512Bf16(importlib.abc.MetaPathFinder):  # bitsandbytes then probes its CPU hub kernel on import
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, PretendAvx512Bf16())
"""


_OUR_IMPORT = """
import importlib.util
spec = importlib.util.spec_from_file_location("imports", {path!r})  # the one way the package imports bitsandbytes,
imports = importlib.util.module_from_spec(spec)  # loaded alone: the package would import Lightning (~10 s of CPU)
spec.loader.exec_module(imports)
imports.bitsandbytes()
"""


@pytest.mark.parametrize("how", ["plain import", "NF4Precision"])
def test_bitsandbytes_hub_kernel_note_is_not_shown_when_the_plugin_imports_it(how):
    """NF4Precision's constructor imports bitsandbytes through ``utils.imports.bitsandbytes``, run here in a fresh
    interpreter on a CPU that bitsandbytes takes for AVX512-BF16 (so it probes its hub kernel and logs the note)."""
    import subprocess
    import sys

    from lightning_qlora.utils import imports

    use = "import bitsandbytes" if how == "plain import" else _OUR_IMPORT.format(path=imports.__file__)
    run = subprocess.run([sys.executable, "-c", _AVX512_BF16_CPU + use], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    shown = "gemm_4bit_forward" in run.stderr
    if how == "plain import":
        if not shown:
            pytest.skip("bitsandbytes loaded its CPU hub kernel here (kernels installed, hub reachable)")
    else:
        assert not shown, run.stderr[-2000:]


@pytest.mark.parametrize("auto", [torch.bfloat16, torch.float32], ids=["bf16-native", "bf16-emulated"])
def test_an_explicit_fp32_compute_dtype_warns_only_where_a_16_bit_dtype_is_native(monkeypatch, auto):
    """fp32 is slow where bf16/fp16 is native; on a CPU that only emulates bf16 it is the fast choice (auto's)."""
    import lightning_qlora.plugins.precision as precision

    real = precision.to_dtype
    monkeypatch.setattr(precision, "to_dtype", lambda value: auto if str(value).lower() == "auto" else real(value))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        NF4Precision(compute_dtype="fp32")
    slow = [str(w.message) for w in caught if "correct but slow" in str(w.message)]
    assert len(slow) == (1 if auto == torch.bfloat16 else 0), slow
