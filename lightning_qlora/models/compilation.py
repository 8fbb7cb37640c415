"""Regional ``torch.compile``: each transformer block compiled on its own, the rest of the model left eager.

Compiling the blocks (not the whole model) is what torchtune and the PyTorch tutorials on regional compilation do:
the blocks of a decoder share one code object and one set of guards, so a 32- or 80-layer model compiles one block
once and reuses it for every layer (no recompile per layer), and the embedding, loss and Lightning's loop stay eager.
Inside a block, Inductor fuses the elementwise work around the matmuls (RMSNorm, rotary embedding, SiLU·mul, residual
adds, casts, the LoRA dropout and its bit-packed mask) that eager PyTorch runs as separate kernels.

What stays as it is: the 4-bit codes (bitsandbytes' own ``dequantize_4bit`` op runs inside the graph), parameter
names (``Module.compile`` compiles in place, so state dicts, checkpoints and PEFT exports keep their keys), and
activation checkpointing (traced as a checkpoint region, so Inductor recomputes it in backward instead of saving it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_qlora.utils.modules import require_decoder_blocks


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place with ``Module.compile``."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_blocks(root: nn.Module, **compile_kwargs: Any) -> int:
    """Compile each block of ``root`` in place with ``torch.compile`` (idempotent); returns how many are compiled.

    Call it after the blocks are final (adapters injected, checkpointing set up): compilation itself happens at each
    block's first call, and swapping a submodule afterwards only costs a recompile.

    Args:
        root: the network (a transformers model or anything whose largest ``ModuleList`` holds its blocks).
        **compile_kwargs: passed to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``, ``dynamic=False``).

    Raises:
        ValueError: if ``root`` has no ``ModuleList`` of blocks.
    """
    blocks = require_decoder_blocks(root, "compile_blocks")
    for block in blocks:
        if not is_compiled(block):
            block.compile(**compile_kwargs)
    return len(blocks)


def graph_break_counts() -> dict[str, int]:
    """The graph breaks ``torch.compile`` has counted in this process so far, by reason."""
    from torch._dynamo.utils import counters

    return {str(reason): count for reason, count in counters["graph_break"].items()}


def graph_break_report(before: dict[str, int] | None = None) -> str | None:
    """One line on the graph breaks counted since ``before`` (a :func:`graph_break_counts`), or ``None`` if none.

    A graph break (for example a Python hook with side effects inside a checkpointed block) silently runs that part
    of the block eager, so the compile costs its time and buys nothing there.
    """
    before = before or {}
    breaks = {k: n - before.get(k, 0) for k, n in graph_break_counts().items() if n > before.get(k, 0)}
    if not breaks:
        return None
    reason, _ = max(breaks.items(), key=lambda item: item[1])
    reason = " ".join(str(reason).split())[:200]
    return (
        f"torch.compile broke the compiled graphs {sum(breaks.values())} times (most often: {reason}); those parts "
        "run eager. Rerun with TORCH_LOGS=graph_breaks to see where, or turn compile_blocks off"
    )


__all__ = ["compile_blocks", "graph_break_counts", "graph_break_report", "is_compiled"]
