"""Lightning strategies: one device with a paged optimizer, DDP, FSDP and FSDP2 for a 4-bit base.

Importing this package registers ``paged_optimizer``, ``paged_ddp``, ``qlora_fsdp`` and ``qlora_fsdp2`` with
Lightning's ``StrategyRegistry``.
"""

from lightning_qlora.strategies.ddp import PagedDDPStrategy
from lightning_qlora.strategies.fsdp import QLoRAFSDPStrategy
from lightning_qlora.strategies.fsdp2 import QLoRAFSDP2Strategy
from lightning_qlora.strategies.single_device import PagedOptimizerStrategy

__all__ = ["PagedDDPStrategy", "PagedOptimizerStrategy", "QLoRAFSDP2Strategy", "QLoRAFSDPStrategy"]
