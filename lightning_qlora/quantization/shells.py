"""Empty 4-bit shells for a model's matmul layers, chosen module by module (no class is ever patched).

A shell is an :class:`~lightning_qlora.quantization.nf4_linear.NF4Linear` whose weight is on the meta device until
a full-precision weight arrives (from a checkpoint, through transformers' loading, or a random draw) and is
quantized on the spot. Which module becomes what:

* ``nn.Linear``, and subclasses that reimplement the linear map (Falcon's ``FalconLinear``): a plain shell.
* subclasses whose ``forward`` calls ``super().forward`` (a router that post-processes its logits): a shell of a
  class deriving from both, so their extra behaviour stays (``type(cls.__name__ + "4bit", (cls, NF4Linear))``).
* GPT-2's ``Conv1D`` (``y = x·W + b``, ``W`` stored in × out): a shell marked ``source_cls = Conv1D``, whose weight is
  transposed once on arrival, so the 4-bit layer is an ordinary ``out × in`` linear.
* routers (the small linear that picks experts) and the skip list (the output head) stay full precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_qlora.quantization.linear_probe import conv1d_class, is_linear_like, stands_in_as_linear
from lightning_qlora.quantization.nf4 import DEFAULT_SKIP_MODULES, QuantizationConfig, is_skipped, make_params4bit
from lightning_qlora.utils.imports import bitsandbytes

ROUTER_NAMES = ("router", "gate", "shared_expert_gate")
"""Last name components of the modules that route tokens to experts (kept in full precision)."""

_COMBINED: dict[type, type] = {}


def _deferred_class() -> type:
    from lightning_qlora.quantization.nf4_linear import NF4Linear

    class Deferred4bitLinear(NF4Linear):
        """An ``NF4Linear`` created empty (meta weight) that quantizes the weight it is loaded with.

        ``load_state_dict`` quantizes an arriving full-precision weight onto ``target_device`` in ``bias_dtype`` (the
        model's dtype, as transformers casts before bitsandbytes), takes pre-quantized bits as they are, fills a
        weight tied to an embedding in place, and keeps the weight of a layer marked ``keep_full_precision``.
        """

        def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool,
            device: Any,
            dtype: torch.dtype | None,
            config: QuantizationConfig,
        ) -> None:
            with torch.device("meta"):
                super().__init__(
                    in_features,
                    out_features,
                    bias=bias,
                    compute_dtype=config.compute_dtype,
                    compress_statistics=config.double_quant,
                    quant_type=config.quant_type,
                    quant_storage=config.quant_storage,
                )
            target = torch.device(device) if device is not None else torch.get_default_device()
            self.quantization_config = config
            self.target_device = target if target.type != "meta" else torch.device("cpu")
            self.bias_dtype = dtype or torch.get_default_dtype()
            self.keep_full_precision = False
            self.requires_grad_(False)

        @property
        def is_tied(self) -> bool:
            """Whether the weight was replaced by a real full-precision tensor (tied to an embedding) before loading."""
            return self.weight.device.type != "meta" and not isinstance(self.weight, bitsandbytes().nn.Params4bit)

        def _load_from_state_dict(
            self,
            state_dict: dict,
            prefix: str,
            local_metadata: dict,
            strict: bool,
            missing_keys: list,
            unexpected_keys: list,
            error_msgs: list,
        ) -> None:
            key = prefix + "weight"
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
            else:
                if prefix and is_skipped(prefix[:-1], self.quantization_config.skip_modules):
                    self.keep_full_precision = True
                head = prefix + "weight."
                stats = {k[len(head) :]: v for k, v in state_dict.items() if k.startswith(head)}
                self.load_weight(state_dict[key], stats, error_msgs, key)
            if self.bias is not None:
                if prefix + "bias" in state_dict:
                    bias = state_dict[prefix + "bias"]
                    self.bias = nn.Parameter(bias.to(self.target_device, self.bias_dtype), requires_grad=False)
                elif strict:
                    missing_keys.append(prefix + "bias")

        def load_weight(self, tensor: torch.Tensor, stats: dict, error_msgs: list, key: str) -> None:
            """Fill the shell with ``tensor`` (see the class docstring); a size mismatch goes to ``error_msgs``."""
            bnb = bitsandbytes()
            if stats:  # already 4-bit (a bitsandbytes/peft/HF state dict): take the bits as they are
                self.weight = bnb.nn.Params4bit.from_prequantized(
                    data=tensor, quantized_stats=stats, requires_grad=False, device=self.target_device, module=self
                )
            else:
                try:
                    tensor = arrived_weight(self, tensor)
                except ValueError:
                    error_msgs.append(
                        f"size mismatch for {key}: copying a param with shape {tuple(tensor.shape)}, "
                        f"the layer expects {(self.out_features, self.in_features)}"
                    )
                    return
                if self.is_tied:  # shared with an embedding (a tied output head): fill in place, never quantize
                    with torch.no_grad():
                        self.weight.copy_(tensor)
                    self.keep_full_precision = True
                    return
                if self.keep_full_precision:
                    self.weight = nn.Parameter(tensor.to(self.target_device, self.bias_dtype), requires_grad=False)
                    return
                if tensor.is_floating_point() and tensor.dtype != self.bias_dtype:
                    tensor = tensor.to(self.bias_dtype)
                self.weight = make_params4bit(tensor, self.quantization_config, self.target_device)
                self.weight.module = self
            self.quant_state = self.weight.quant_state

    return Deferred4bitLinear


_DEFERRED_CLS: type | None = None


def deferred_linear_class() -> type:
    """The ``Deferred4bitLinear`` shell class (bitsandbytes is imported on first use)."""
    global _DEFERRED_CLS
    if _DEFERRED_CLS is None:
        _DEFERRED_CLS = _deferred_class()
    return _DEFERRED_CLS


def is_shell(module: nn.Module) -> bool:
    """Whether ``module`` is a quantize-on-load shell (filled or not)."""
    return _DEFERRED_CLS is not None and isinstance(module, _DEFERRED_CLS)


def is_router(name: str, module: nn.Module) -> bool:
    """Whether ``module`` routes tokens to experts (by its name or class name): routers stay full precision."""
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES or type(module).__name__.endswith("Router")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module (a ``Conv1D`` stores its weight in × out)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # nn.Linear, 4-bit layers, LoRA wrappers
        return int(module.in_features), int(module.out_features)
    rows, cols = module.weight.shape
    return int(rows), int(cols)


def _calls_super_forward(cls: type) -> bool:
    forward = cls.__dict__.get("forward")
    return forward is not None and "super" in forward.__code__.co_names


def shell_class(module: nn.Module) -> type:
    """The 4-bit class that replaces ``module`` (see the module docstring for the rules)."""
    base = deferred_linear_class()
    cls = type(module)
    if cls is nn.Linear or not isinstance(module, nn.Linear) or not _calls_super_forward(cls):
        return base
    if cls not in _COMBINED:
        _COMBINED[cls] = type(f"{cls.__name__}4bit", (cls, base), {"__module__": cls.__module__})
    return _COMBINED[cls]


def make_shell(module: nn.Module, config: QuantizationConfig, device: torch.device | str) -> nn.Module:
    """An empty 4-bit shell standing in for ``module`` (its weight and bias on the meta device).

    Args:
        module: an ``nn.Linear`` (or subclass) or ``Conv1D``.
        config: the 4-bit settings.
        device: where the weight is quantized when it arrives.
    """
    in_features, out_features = linear_shape(module)
    cls = shell_class(module)
    shell = cls.__new__(cls)
    bias = getattr(module, "bias", None)
    dtype = bias.dtype if bias is not None and bias.is_floating_point() else module.weight.dtype
    deferred_linear_class().__init__(shell, in_features, out_features, bias is not None, device, dtype, config)
    for key, value in module.__dict__.items():  # a router's top_k, a layer's own flags
        shell.__dict__.setdefault(key, value)
    shell.source_cls = type(module)
    shell.train(module.training)
    return shell


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head of the first transformers model in ``model`` (``get_output_embeddings``), if any."""
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (AttributeError, NotImplementedError, TypeError):
                continue
            if isinstance(head, nn.Module):
                return head
    return None


def head_patterns(model: nn.Module, patterns: Iterable[str]) -> tuple[nn.Module | None, tuple[str, ...]]:
    """``(head, patterns)``: a model that names its head keeps it by identity, not by the default head names.

    The default names (``lm_head``, ``output``, ...) guess the head of models that do not say which it is; where
    the model says (``get_output_embeddings``), an inner layer that happens to be called ``output`` is an ordinary
    layer and a head called ``head`` is still the head. Patterns without the default names are the user's own
    choice and are used as they are.
    """
    patterns = tuple(patterns)
    head = output_head(model) if set(patterns) & set(DEFAULT_SKIP_MODULES) else None  # defaults in effect
    if head is None:
        return None, patterns
    return head, tuple(p for p in patterns if p not in DEFAULT_SKIP_MODULES)


def shell_candidates(model: nn.Module, config: QuantizationConfig) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every full-precision linear-like module :func:`to_shells` would replace.

    Skip patterns and the router rule apply to the logical name (a LoRA wrapper's frozen ``base_layer`` has its
    wrapper's name); 4-bit layers, shells, routers, the skip list and heads tied to an embedding are left alone.
    """
    four_bit = bitsandbytes().nn.Linear4bit
    tied = _tied_to_embeddings(model) if config.skip_tied else set()
    head, skip = head_patterns(model, config.skip_modules)
    for name, module in model.named_modules():
        if not is_linear_like(module) or is_shell(module) or isinstance(module, four_bit) or module is head:
            continue
        logical = name.removesuffix(".base_layer")
        if is_skipped(logical, skip) or is_router(logical, module) or name in tied:
            continue
        if not stands_in_as_linear(model, name, module):  # its weight is read directly, or it is no linear map
            continue
        yield name, module


def to_shells(model: nn.Module, config: QuantizationConfig, device: torch.device | str) -> list[str]:
    """Replace every candidate (see :func:`shell_candidates`) with an empty 4-bit shell, in place.

    Returns:
        The names of the replaced modules.
    """
    names = []
    for name, module in list(shell_candidates(model, config)):
        model.set_submodule(name, make_shell(module, config, device))
        names.append(name)
    return names


def arrived_weight(shell: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor in the layout the shell quantizes: ``out × in`` (a ``Conv1D``'s ``in × out`` transposed).

    Raises:
        ValueError: when the tensor's shape fits neither layout.
    """
    conv1d = conv1d_class()
    if conv1d is not None and getattr(shell, "source_cls", None) is not None and issubclass(shell.source_cls, conv1d):
        tensor = tensor.t()
    if tuple(tensor.shape) != (shell.out_features, shell.in_features):
        raise ValueError(
            f"a weight of shape {tuple(tensor.shape)} does not fit a {shell.out_features}x{shell.in_features} layer"
        )
    return tensor.contiguous()


def _tied_to_embeddings(model: nn.Module) -> set[str]:
    """Names of linear-like modules whose weight is (or will be, per the config) the input embedding's."""
    config: Any = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False)) if config is not None else False
    names = set()
    if tied and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        names |= {n for n, m in model.named_modules() if m is head and head is not None}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names |= {n for n, m in model.named_modules() if is_linear_like(m) and id(m.weight) in embeddings}
    return names


def quantize_model(
    model: nn.Module, config: QuantizationConfig | None = None, device: torch.device | str | None = None
) -> list[str]:
    """Quantize every full-precision linear-like layer (see :func:`shell_candidates`) and expert stack, in place.

    LoRA adapter matrices are ``nn.Parameter``s, never modules, so they are never quantized; the frozen base layer
    inside a ``LoRALinear`` is. Each layer goes through a shell (:func:`make_shell`), filled with its own weight.

    Args:
        model: any module with linear layers.
        config: quantization settings; defaults to NF4 + double quant, blocks of 64, bf16 compute.
        device: where the 4-bit weights go; default: where each weight already lives (CPU weights go to the current
            CUDA device when one is available).

    Returns:
        The names of the layers that were quantized.

    Raises:
        ValueError: if the model has no linear layer at all, or a layer's weight does not fit it.
    """
    from lightning_qlora.quantization.experts import expert_stacks, quantize_expert_stacks
    from lightning_qlora.quantization.nf4 import default_quantization_device, guard_cpu_repack

    config = config or QuantizationConfig()
    expert_stacks(model, skip=config.skip_modules)  # refuse unsupported experts before anything is changed
    names = []
    for name, module in list(shell_candidates(model, config)):
        target = device if device is not None else default_quantization_device(module.weight)
        shell = make_shell(module, config, target)
        weight, bias = module.weight, module.bias
        if weight.device.type == "meta":  # nothing was loaded into it: initialise like nn.Linear does
            fresh = nn.Linear(shell.in_features, shell.out_features, bias=bias is not None, device=target)
            weight, bias = fresh.weight.t() if shell.source_cls is conv1d_class() else fresh.weight, fresh.bias
        errors: list[str] = []
        shell.load_weight(weight.data, {}, errors, f"{name}.weight")
        if errors:
            raise ValueError(f"{errors[0]}; the layer and its weight disagree")
        if bias is not None:
            shell.bias = nn.Parameter(bias.data.to(target), requires_grad=bias.requires_grad)
        model.set_submodule(name, shell)
        names.append(name)
    stacks = quantize_expert_stacks(model, config, device)
    if not names and not stacks and not any(isinstance(m, bitsandbytes().nn.Linear4bit) for m in model.modules()):
        linears = [n for n, m in model.named_modules() if is_linear_like(m)]
        detail = f"only skipped ones: {linears}" if linears else "none at all"
        raise ValueError(
            f"{type(model).__name__} has no linear layer to quantize ({detail}); "
            "NF4Precision needs a model with nn.Linear (or Conv1D) layers (check skip_modules)"
        )
    guard_cpu_repack(model)  # also 4-bit layers that were already there (e.g. bitsandbytes' own Linear4bit)
    return names
