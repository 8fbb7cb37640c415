"""The one way optional heavy dependencies are imported: lazily, on first use, with one line when missing.

``bitsandbytes`` loads native libraries and probes devices, ``lm_eval`` pulls in ``datasets``: importing
``lightning_qlora`` imports neither. Modules that subclass their classes (``quantization.nf4_linear``,
``evaluation.lm``) are themselves imported only on first use.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator
from types import ModuleType


def optional_module(name: str) -> ModuleType:
    """Import ``name`` (a dotted module path) on first use.

    Raises:
        ImportError: naming the package to install when it is missing.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(_missing(name)) from err


def _missing(name: str) -> str:
    package = name.split(".")[0].replace("_", "-")
    return f"lightning_qlora needs {package} here ({name}); install it: pip install {package}"


_BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


class _DropHubKernelProbe(logging.Filter):
    """Drops bitsandbytes' note that its optional CPU hub kernel could not be loaded.

    bitsandbytes tries ``kernels-community/quantization-bitsandbytes`` (a hub download) when it is imported on a CPU
    with AVX512-BF16 and logs a warning when that fails (offline, or without the ``kernels`` package). That kernel
    serves only the CPU inference layout, which ``NF4Linear`` never uses, so nothing the user could do about
    the message would change a run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


@contextlib.contextmanager
def _quiet_hub_kernel_probe() -> Iterator[None]:
    logger = logging.getLogger(_BNB_CPU_KERNEL_LOGGER)
    drop = _DropHubKernelProbe()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, with ``.nn``, ``.nn.modules``, ``.functional`` and ``.optim`` loaded.

    Called inside compiled regions too (the fused LoRA function): a plain import statement, which
    ``torch.compile`` traces without a graph break (``importlib.import_module`` would break the graph).

    Raises:
        ImportError: when bitsandbytes is not installed.
    """
    if "bitsandbytes" not in sys.modules:  # the first import, quietly (see _DropHubKernelProbe)
        with _quiet_hub_kernel_probe():
            _import_bitsandbytes()
    return _import_bitsandbytes()


def _import_bitsandbytes() -> ModuleType:
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(_missing("bitsandbytes")) from err
    return bitsandbytes


def lm_eval(submodule: str = "") -> ModuleType:
    """``lm_eval`` or one of its submodules (``lm_eval("utils")`` is ``lm_eval.utils``).

    Raises:
        ImportError: when lm-eval is not installed.
    """
    return optional_module(f"lm_eval.{submodule}" if submodule else "lm_eval")
