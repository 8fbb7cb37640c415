"""The ``lightning-qlora`` command: LightningCLI recipes (``fit``, ``evaluate``, ...) and the ``memory`` planner."""

from lightning_qlora.cli.main import main

__all__ = ["main"]
