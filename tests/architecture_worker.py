"""Train, export and check tiny models of many transformers architectures in one process, as a user would.

Usage: python tests/architecture_worker.py OUT.json ARCH [ARCH ...]. For each architecture: a tiny model (hidden 64,
2 layers, vocab 512) saved with ``save_pretrained``; ``CausalLM`` fits 3 steps with ``NF4Precision`` + ``LoRA`` +
``PagedOptimizerStrategy`` (fp32 compute, so comparisons are tight); the PEFT export is loaded in peft over (a) the
same base with our 4-bit weights dequantized and (b) where transformers can build one, its own
``BitsAndBytesConfig`` 4-bit base; logits are compared with ours. Results go to OUT.json as each one ends.

``python tests/architecture_worker.py --markdown docs/models.md`` runs every architecture of ``SPECS`` in this one
process and rewrites the generated table of that file (between ``<!-- generated: architecture table -->`` and
``<!-- end generated -->``; the rest of the file is kept).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes as bnb  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from lightning_qlora import CausalLM, LoRA, NF4Precision, PagedOptimizerStrategy  # noqa: E402
from lightning_qlora.lora.experts import expert_lora_modules  # noqa: E402
from lightning_qlora.lora.layer import LoRALinear  # noqa: E402
from lightning_qlora.quantization.experts import expert_weight  # noqa: E402
from lightning_qlora.quantization.linear_probe import conv1d_class, is_linear_like  # noqa: E402
from lightning_qlora.quantization.nf4 import dequantize_weight, guard_cpu_repack, is_4bit_linear  # noqa: E402
from lightning_qlora.quantization.shells import is_router  # noqa: E402

NO_HEAD_DIM = ["head_dim", "num_key_value_heads"]
MOE = {"num_experts_per_tok": 2}
SPECS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {"pad_token_id": 0},
    "gpt_neox": {"rotary_pct": 1.0, "_drop": NO_HEAD_DIM},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64, "_drop": ["intermediate_size", *NO_HEAD_DIM]},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2, "_drop": NO_HEAD_DIM},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0},
    "mixtral": {"num_local_experts": 4, **MOE},
    "qwen3_moe": {
        "num_experts": 4, "moe_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [], **MOE,
    },
    "qwen2_moe": {
        "num_experts": 4, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1,
        "mlp_only_layers": [], **MOE,
    },
    "llama4_text": {
        "num_local_experts": 4, "interleave_moe_layer_step": 1, "intermediate_size_mlp": 128,
        "attention_chunk_size": 64, "no_rope_layers": [1, 1], "layer_types": ["chunked_attention", "full_attention"],
        **MOE,
    },
    "gpt_oss": {
        "num_local_experts": 4, "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"], **MOE,
    },
}  # fmt: skip
HF_BNB_BUILDS = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "opt", "gpt2",
}  # fmt: skip
"""Architectures whose every adapted layer is an exact nn.Linear or Conv1D, which transformers' bnb 4-bit converts."""


def tiny_config(arch: str):
    spec = dict(SPECS[arch])
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, head_dim=16)  # fmt: skip
    for key in spec.pop("_drop", []):
        base.pop(key)
    base.update(spec)
    return AutoConfig.for_model(arch, **base)


def matmul_share(model: torch.nn.Module) -> tuple[float, list[str]]:
    """Share of matmul weights (linear, Conv1D, experts; not embeddings, head or biases) held in 4 bits."""
    head = model.get_output_embeddings()
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    skip |= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    four = full = 0
    left = []
    for name, p in model.named_parameters():
        packed = isinstance(p, bnb.nn.Params4bit)
        if id(p) in skip or "lora_" in name or name.endswith("bias") or (p.dim() < 2 and not packed):
            continue
        if isinstance(p, bnb.nn.Params4bit):
            four += p.numel() * 2 * (p.element_size() if p.dtype != torch.uint8 else 1)
        else:
            full += p.numel()
            left.append(name)
    return four / max(four + full, 1), left


def expected_adapters(arch: str) -> set[str]:
    """Every linear-like layer (routers that post-process their logits excepted) and expert stack but the head."""
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    head = model.get_output_embeddings()
    names = {n for n, m in model.named_modules() if is_linear_like(m) and m is not head}
    plain = {n for n in names if type(model.get_submodule(n)) is torch.nn.Linear}
    names = plain | {n for n in names if not is_router(n, model.get_submodule(n))}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and pname in ("gate_up_proj", "up_proj", "down_proj"):
                names.add(f"{name}.{pname}")
    return names


def dequantized_base(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """The architecture in fp32 holding exactly the weights our 4-bit layers compute with."""
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    state = {}
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if is_4bit_linear(base) and not name.endswith(".base_layer"):
            weight = dequantize_weight(base, torch.float32)
            state[f"{name}.weight"] = weight.t() if getattr(base, "source_cls", None) is conv1d_class() else weight
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(p, bnb.nn.Params4bit) and len(p.quant_state.shape) == 3:
                experts = p.quant_state.shape[0]
                state[f"{name}.{pname}"] = torch.stack([expert_weight(p, e, torch.float32) for e in range(experts)])
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    return ref


def run(arch: str, root: Path) -> dict:
    from peft import PeftModel

    directory, adapter = root / arch, root / f"{arch}-adapter"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(arch)).save_pretrained(directory)
    module = CausalLM(model=str(directory), dtype="fp32", lr=1e-2)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        plugins=[NF4Precision(compute_dtype="fp32")],
        callbacks=[LoRA(r=8, alpha=16, dropout=0.0, export_dir=str(adapter)), Losses()],
        strategy=PagedOptimizerStrategy(), max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader([{"input_ids": ids, "labels": ids}] * 3, batch_size=None))
    model = module.model.eval()
    share, left = matmul_share(model)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    adapted |= {n for n, _ in expert_lora_modules(model)}
    with torch.no_grad():
        ours = model(ids).logits
        peft_dequantized = PeftModel.from_pretrained(dequantized_base(model, directory), str(adapter)).eval()
        diff = (ours - peft_dequantized(ids).logits).abs().max().item()
        bnb_diff = None
        if arch in HF_BNB_BUILDS:
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
            hf = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=torch.float32)
            # bitsandbytes' own CPU inference path on AVX512-BF16 CPUs repacks the codes for a bf16 kernel (~2e-3 off
            # in fp32 here); keep it on the fp32 dequantize + matmul path ours takes, so the codes are what's compared
            guard_cpu_repack(hf)
            bnb_diff = (ours - PeftModel.from_pretrained(hf, str(adapter)).eval()(ids).logits).abs().max().item()
    return {
        "losses": losses,
        "share_4bit": share,
        "full_precision": left,
        "adapted": sorted(adapted),
        "expected": sorted(expected_adapters(arch)),
        "attn_implementation": model.config._attn_implementation,
        "peft_dequantized_max_diff": diff,
        "peft_hf_bnb_max_diff": bnb_diff,
        "model_class": type(model).__name__,
        "expert_stacks": sorted(n for n, _ in expert_lora_modules(model)),
    }


def run_all(out: Path, archs: list[str]) -> dict:
    """Run ``archs`` one after the other, writing every result to ``out`` as it ends."""
    results: dict = {}
    root = Path(tempfile.mkdtemp(prefix="archs-"))
    for arch in archs:
        start = time.perf_counter()
        try:
            results[arch] = run(arch, root)
        except Exception as err:  # recorded for the test to report, one architecture at a time
            results[arch] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=-6)}
        results[arch]["seconds"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(results, indent=1))
    return results


TABLE_START, TABLE_END = "<!-- generated: architecture table -->", "<!-- end generated -->"
NO_HF_BNB = "n/a: bnb leaves experts/subclasses full precision"


def _diff(value: float | None) -> str:
    return NO_HF_BNB if value is None else "0" if value == 0 else f"{value:.1e}"


def _adapted(result: dict) -> str:
    stacks = result.get("expert_stacks", [n for n in result["adapted"] if ".experts." in n])
    text = f"{len(result['adapted']) - len(stacks)}" + (f" + {len(stacks)} expert stacks" if stacks else "")
    if result["adapted"] != result["expected"]:
        text += f" (expected {len(result['expected'])})"
    return text


def markdown_table(results: dict, command: str) -> str:
    """The generated section: one row per architecture, then the command, versions and machine."""
    import peft
    import transformers

    head = ["architecture", "model class", "matmul weights in 4 bits", "adapted layers", "attention",
            "loss step 1 → 3", "max \\|Δlogit\\| vs peft, dequantized base", "vs peft, HF BitsAndBytesConfig base",
            "seconds"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for arch, r in results.items():
        if "error" in r:
            message = " ".join(r["error"].split())[:200].replace("|", "\\|")
            rows.append(f"| `{arch}` | failed: {message} |" + " |" * (len(head) - 3) + f" {r['seconds']} |")
            continue
        losses = f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f}" if r["losses"] else "-"
        cells = [f"`{arch}`", f"`{r['model_class']}`", f"{100 * r['share_4bit']:.2f} %", _adapted(r),
                 r["attn_implementation"], losses, _diff(r["peft_dequantized_max_diff"]),
                 _diff(r["peft_hf_bnb_max_diff"]), f"{r['seconds']}"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    footer = (
        f"Generated by `{command}` with torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bnb.__version__} on a "
        f"{machine}; 3 steps, fp32 compute, LoRA r=8."
    )
    return "\n".join(rows) + "\n\n" + footer + "\n"


def write_section(path: Path, start: str, body: str, end: str = TABLE_END) -> None:
    """Replace the text between ``start`` and the next ``end`` in ``path`` (appended when the markers are absent)."""
    text = path.read_text() if path.is_file() else ""
    section = f"{start}\n{body}{end}"
    match = re.search(re.escape(start) + r".*?" + re.escape(end), text, flags=re.S)
    if match:
        text = text[: match.start()] + section + text[match.end() :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    path.write_text(text)


def main() -> None:
    if sys.argv[1:2] == ["--markdown"]:
        if len(sys.argv) != 3:
            sys.exit("usage: python tests/architecture_worker.py --markdown docs/models.md")
        target = Path(sys.argv[2])
        out = Path(tempfile.mkdtemp(prefix="archs-json-")) / "results.json"
        results = run_all(out, list(SPECS))
        command = f"python tests/architecture_worker.py --markdown {target}"
        write_section(target, TABLE_START, markdown_table(results, command))
        print(f"{target}: table of {len(results)} architectures written (raw results: {out})")
        return
    out, archs = Path(sys.argv[1]), sys.argv[2:]
    run_all(out, archs)


if __name__ == "__main__":
    main()
