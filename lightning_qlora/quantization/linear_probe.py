"""Which linear-like modules a 4-bit weight and an adapter can stand in for: those used only as ``x·Wᵀ + b``.

A model can use a linear layer in two other ways, and then neither a packed 4-bit weight nor an adapter works:

* its parent reads the weight as a tensor (Mamba's ``self.dt_proj.weight @ time_step``): the packed codes are not
  the matrix, and an adapter would never be added to what the parent reads;
* an ``nn.Linear`` subclass whose own forward is not the linear map (DeepSeek-V4's grouped output projection views its
  weight as one block per head group): an adapter's ``x·Aᵀ`` does not fit its input.

Such modules keep their full-precision weight and get no adapter, as routers do (one warning per class). The first
is found in the parent class's source (every method but initialisation and tying, parsed once per class; a read
under an ``if`` that the module's own settings decide against does not count), the second by running the subclass's
forward once on a probe input (meta tensors when the weight is not loaded yet).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lightning_qlora.quantization.nf4 import is_4bit_linear

_METADATA = frozenset({"dtype", "device", "shape", "size", "ndim", "dim", "requires_grad", "data", "numel",
                       "element_size", "nelement", "get_device"})  # fmt: skip
"""Attributes of ``self.<child>.weight`` that read its metadata, not its values (so do ``is_*``, ``new_*``, ``_*``)."""


def conv1d_class() -> type | None:
    """Transformers' ``Conv1D`` (GPT-2 style layers), or ``None`` without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` computes a linear map from a 2-D weight: ``nn.Linear`` (or a subclass) or a ``Conv1D``."""
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


@dataclass(frozen=True)
class _Read:
    child: str
    """The child whose ``.weight`` is read."""
    guards: tuple[tuple[ast.expr, bool], ...]
    """The ``if`` tests around the read, each with the truth value under which the read runs."""


@functools.cache
def _reads(cls: type) -> tuple[_Read, ...]:
    reads: list[_Read] = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch."):
            continue
        for attr, value in vars(klass).items():
            if not inspect.isfunction(value) or "init" in attr or "tie" in attr:
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(value)))
            except (OSError, TypeError, SyntaxError):  # built at runtime, no source
                continue
            reads += _scan(tree, ())
    return tuple(reads)


def _scan(node: ast.AST, guards: tuple[tuple[ast.expr, bool], ...]) -> Iterator[_Read]:
    """``self.<child>.weight`` read as a tensor: not metadata, an ``isinstance`` check or an assignment (tying)."""
    if isinstance(node, ast.If):
        yield from _scan(node.test, guards)
        for branch, taken in ((node.body, True), (node.orelse, False)):
            for statement in branch:
                yield from _scan(statement, (*guards, (node.test, taken)))
        return
    if isinstance(node, ast.Attribute) and _weight_of(node.value) and _is_metadata(node.attr):
        return
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "hasattr"):
        return
    child = _weight_of(node)
    if child is not None and isinstance(node.ctx, ast.Load):  # type: ignore[attr-defined]
        yield _Read(child, guards)
        return
    for inner in ast.iter_child_nodes(node):
        yield from _scan(inner, guards)


def _weight_of(node: ast.AST) -> str | None:
    """``child`` for the expression ``self.child.weight``, else None."""
    if isinstance(node, ast.Attribute) and node.attr == "weight" and isinstance(node.value, ast.Attribute):
        owner = node.value.value
        if isinstance(owner, ast.Name) and owner.id == "self":
            return node.value.attr
    return None


def _is_metadata(attr: str) -> bool:
    return attr in _METADATA or attr.startswith(("is_", "new_", "_"))


def _runs(guard: tuple[ast.expr, bool], module: nn.Module) -> bool:
    """Whether a read under ``guard`` can run in ``module``: False only when the test is decided by its settings.

    Only tests over ``self.<setting>`` (a bool, number, string or None fixed from the config, not ``training``)
    without calls are evaluated; any other test may change at run time, so its read counts.
    """
    test, taken = guard
    for node in ast.walk(test):
        if isinstance(node, (ast.Call, ast.Lambda, ast.NamedExpr)) or isinstance(node, ast.Name) and node.id != "self":
            return True
        if isinstance(node, ast.Attribute) and not _setting(module, node):
            return True
    try:
        value = eval(compile(ast.Expression(test), "<guard>", "eval"), {"__builtins__": {}}, {"self": module})  # noqa: S307
    except Exception:  # noqa: BLE001 (undecided: the read counts)
        return True
    return bool(value) == taken


def _setting(module: nn.Module, node: ast.Attribute) -> bool:
    """Whether ``node`` is ``self.<name>`` holding a fixed setting of ``module`` (not its ``training`` flag)."""
    if not isinstance(node.value, ast.Name) or node.attr == "training":
        return False
    value = getattr(module, node.attr, ...)
    return value is None or isinstance(value, (bool, int, float, str))


def weights_read_by(owner: type | nn.Module) -> frozenset[str]:
    """Names of the children whose ``.weight`` a module reads as a tensor outside its initialisation methods.

    Args:
        owner: a module class (every read counts), or a module: reads under an ``if`` that its settings decide
            against (Bloom's ``if self.pretraining_tp > 1 and self.slow_but_exact:``) do not count.
    """
    if isinstance(owner, type):
        return frozenset(read.child for read in _reads(owner))
    return frozenset(r.child for r in _reads(type(owner)) if all(_runs(guard, owner) for guard in r.guards))


def _own_forward(cls: type) -> bool:
    """Whether a class between ``cls`` and ``nn.Linear`` defines a forward that does not call ``super``'s."""
    for klass in cls.__mro__:
        if klass is nn.Linear:
            return False
        forward = vars(klass).get("forward")
        if forward is not None:
            return "super" not in forward.__code__.co_names
    return False


_LINEAR_CLASSES: dict[type, bool] = {}
_WARNED: set[type] = set()


def computes_linear_map(module: nn.Module) -> bool:
    """Whether ``module``'s forward is ``x·Wᵀ + b`` over its whole weight (probed once per class; see the module doc).

    Args:
        module: a linear-like module (``nn.Linear`` or a subclass; anything else is taken as it is).
    """
    cls = type(module)
    if cls is nn.Linear or not isinstance(module, nn.Linear) or not _own_forward(cls):
        return True
    if is_4bit_linear(module) or getattr(module, "source_cls", None) is not None:
        return True  # ours, or bitsandbytes' own: quantized as a linear map (the source class was probed before)
    if cls not in _LINEAR_CLASSES:
        _LINEAR_CLASSES[cls] = _probe(module)
    return _LINEAR_CLASSES[cls]


@torch.no_grad()
def _probe(module: nn.Linear) -> bool:
    weight, bias = module.weight, module.bias
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x = x.to(device=weight.device, dtype=dtype)
    try:
        y = type(module).forward(module, x)
    except Exception:  # noqa: BLE001 (any error means: not the linear map over this input)
        return False
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (3, module.out_features):
        return False
    if weight.device.type == "meta" or not weight.is_floating_point():
        return True
    expected = F.linear(x, weight, bias)
    return bool(torch.allclose(y.float(), expected.float(), rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-6))


def stands_in_as_linear(model: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether the linear-like ``module`` at ``name`` in ``model`` may be quantized and adapted.

    Names inside a LoRA wrapper (``....base_layer``) are judged by the wrapper's parent. Warns once per class for a
    module left in full precision.
    """
    logical = name.removesuffix(".base_layer")
    parent_name, _, leaf = logical.rpartition(".")
    parent = model.get_submodule(parent_name)  # "" is the model itself
    reads = weights_read_by(parent)
    if leaf in reads:
        read = ", ".join(n for n in sorted(reads) if n == leaf or is_linear_like(getattr(parent, n, None)))
        _warn_once(
            type(parent),
            f"{type(parent).__name__} reads the weights of {read} itself, so those layers stay in full precision "
            "without adapters",
        )
        return False
    if not computes_linear_map(module):
        _warn_once(
            type(module),
            f"{type(module).__name__} ({logical}) does not compute x·Wᵀ + b over its weight, so it and its kind stay "
            "in full precision without an adapter",
        )
        return False
    return True


def _warn_once(key: type, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


__all__ = ["computes_linear_map", "conv1d_class", "is_linear_like", "stands_in_as_linear", "weights_read_by"]
