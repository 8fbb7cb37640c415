"""``python -m lightning_qlora.cli``: the same as the ``lightning-qlora`` command."""

from lightning_qlora.cli.main import main

main()
