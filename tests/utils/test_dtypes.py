import pytest
import torch
import yaml

from lightning_qlora.utils.dtypes import dtype_name, to_dtype


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "torch.bfloat16", "BF16", torch.bfloat16])
def test_bfloat16_spellings(spelling):
    assert to_dtype(spelling) is torch.bfloat16


@pytest.mark.parametrize(
    "spelling, dtype",
    [("fp16", torch.float16), ("float32", torch.float32), ("torch.float16", torch.float16), ("uint8", torch.uint8)],
)
def test_other_spellings(spelling, dtype):
    assert to_dtype(spelling) is dtype and to_dtype(dtype_name(dtype)) is dtype


def test_unknown_dtype_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown dtype 'bf17'; use one of bf16") as err:
        to_dtype("bf17")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "torch.bfloat16"])
def test_recipe_dtype_spellings_reach_the_plugin(spelling, tmp_path, monkeypatch, capsys):
    """`compute_dtype` in YAML accepts every spelling and ends up as torch.bfloat16 in the plugin."""
    import sys

    from lightning_qlora.cli.main import QLoRACLI

    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    config = {
        "trainer": {
            "plugins": [{"class_path": "lightning_qlora.NF4Precision", "init_args": {"compute_dtype": spelling}}],
            "logger": False,
        },
        "model": {"class_path": "lightning_qlora.CausalLM", "init_args": {"model": str(tmp_path)}},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = QLoRACLI(run=False, args=["--config", str(path)])
    assert cli.trainer.precision_plugin.config.compute_dtype is torch.bfloat16


def test_auto_is_the_fast_exact_dtype_of_the_device(monkeypatch):
    import torch

    from lightning_qlora.utils import dtypes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(dtypes, "_cpu_has_native_bf16", lambda native=native: native)
        assert dtypes.to_dtype("auto") == dtypes.to_dtype("AUTO") == expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert dtypes.fast_compute_dtype("cuda") == torch.float16
