"""How every ``lightning-qlora`` command reads a recipe with LightningCLI."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

RECIPE_CLI_ARGS: dict[str, Any] = {
    "model_class": pl.LightningModule,  # any module by class_path: CausalLM, PreferenceLM, a user's own
    "datamodule_class": None,  # optional (`evaluate`, `generate` need none), any DataModule by class_path
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "auto_configure_optimizers": False,  # the module's configure_optimizers (and the strategy's paged optimizers)
}
"""The LightningCLI arguments ``fit``/``evaluate``, ``generate``/``chat``/``serve`` and ``memory`` share."""
