"""``LiveTensorTracker``: the peak bytes of live tensor storages allocated inside a block, on any device (CPU too).

``torch.cuda.max_memory_allocated`` only exists on CUDA and the process RSS also counts the allocator's cache, the
Python heap and the libraries. This tracker sees every tensor an ATen op (or a custom op such as bitsandbytes')
returns inside the block, counts each storage once (views share it) and subtracts it when Python frees it, so its
peak is what the caching allocator of a GPU would have to hold for the same ops: the activation/gradient peak that
:mod:`lightning_qlora.memory.planner` predicts. Tensors that existed before the block (the model) are not counted.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    """Track live bytes of the tensors created inside ``with LiveTensorTracker() as t:``; read ``t.peak`` after.

    Temporaries that live only inside one kernel (workspaces) are not seen. Use one tracker per block: it is a
    ``TorchDispatchMode``, so ops run a little slower inside it.

    Args:
        devices: device types to count (default: all but ``meta``).
    """

    def __init__(self, devices: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.devices = devices
        self.current = 0
        """Bytes of tracked storages alive now."""
        self.peak = 0
        """Largest ``current`` seen inside the block."""
        self._live: dict[tuple[str, int], tuple[int, Any]] = {}

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now (e.g. after the forward, to measure backward alone)."""
        self.peak = self.current

    def _track(self, tensor: torch.Tensor) -> None:
        device = tensor.device.type
        if device == "meta" or (self.devices is not None and device not in self.devices):
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = _key(tensor)
        if nbytes == 0 or key[1] == 0:
            return
        if key in self._live and self._live[key][0] >= nbytes:
            return
        if key in self._live:  # a storage resized in place: count the new size once
            self.current -= self._live[key][0]
        self._live[key] = (nbytes, weakref.ref(storage, self._freed(key, nbytes)))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _freed(self, key: tuple[str, int], nbytes: int) -> Any:
        def callback(_: Any) -> None:
            entry = self._live.get(key)
            if entry is not None and entry[0] == nbytes:
                del self._live[key]
                self.current -= nbytes

        return callback

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and _key(value) not in inputs:  # views, detach, in-place: no new memory
                self._track(value)
        return out


def _key(tensor: torch.Tensor) -> tuple[str, int]:
    if tensor.device.type == "meta":
        return ("meta", id(tensor))
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (an iterable of tensors, e.g. ``model.parameters()``)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
