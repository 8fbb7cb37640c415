"""The packing anchor: TRL's ``SFTTrainer`` with ``packing=True`` (best-fit decreasing) and ``padding_free=True``.

Over HF transformers + ``BitsAndBytesConfig`` NF4 + double quant + peft LoRA (r=64, α=16, dropout 0.05, all linear
layers), gradient checkpointing, constant lr 2e-4 and bitsandbytes AdamW (paged on CUDA), completion-only loss: the
same rows as ours (pre-tokenized, ``completion_mask`` on the responses), packed into sequences of ``max_length``
tokens, ``batch`` sequences a step. Step times come from the Trainer's ``on_step_begin``/``on_step_end``
(synchronised); trained tokens from the collated batches. TRL is a bench extra (``pip install -e .[bench]``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _tokenizer(pad_id: int = 0) -> Any:
    """A stand-in tokenizer: TRL's collator reads only its pad token (the rows are tokenized already)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": pad_id, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


def _checkpoint(model: str, preset: dict[str, Any], folder: Path) -> str:
    """A folder HF can load: the demo's converted GGUF, or the preset's random Llama saved (bench/workloads.py)."""
    if not model.endswith(".json"):
        from lightning_qlora.models.sources import resolve_model_dir

        return str(resolve_model_dir(model))
    from workloads import build_model_dir

    build_model_dir(preset["arch"], folder, "cpu")
    return str(folder)


def run_trl_padding_free(args: Any, preset: dict[str, Any], rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """One run of the anchor on ``rows``; returns the row ``bench/packing.py`` prints.

    Args:
        args: ``bench/packing.py``'s arguments (``device``, ``compute_dtype``, ``warmup``).
        preset: ``max_length``, ``batch`` and ``steps``.
        rows: pre-tokenized rows (``input_ids``, ``labels`` with -100 on the prompt).
        model: ours' model argument (a ``config.json`` or the demo's GGUF source).
    """
    import bitsandbytes as bnb
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if args.compute_dtype == "bf16" else torch.float32
    times: list[float] = []
    trained: list[int] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory(prefix="qlora_trl_") as root:
        source = _checkpoint(model, preset, Path(root) / "model")
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        hf = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, quantization_config=quant, device_map={"": "cuda" if cuda else "cpu"}
        )
        hf = prepare_model_for_kbit_training(hf, use_gradient_checkpointing=True)
        hf = get_peft_model(hf, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
        data = Dataset.from_list(
            [{"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]} for r in rows]
        )
        config = SFTConfig(
            output_dir=root,
            max_steps=preset["steps"],
            per_device_train_batch_size=preset["batch"],
            max_length=preset["max_length"],
            packing=True,
            packing_strategy="bfd",
            padding_free=True,
            completion_only_loss=True,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            gradient_checkpointing=True,
            bf16=dtype == torch.bfloat16,
            use_cpu=not cuda,
            report_to=[],
            logging_steps=1000,
            save_strategy="no",
            dataloader_num_workers=0,
            seed=0,
        )
        optimizer_cls = bnb.optim.PagedAdamW32bit if cuda else bnb.optim.AdamW32bit
        params = [p for p in hf.parameters() if p.requires_grad]
        trainer = SFTTrainer(
            model=hf,
            args=config,
            train_dataset=data,
            processing_class=_tokenizer(),
            callbacks=[Timer()],
            optimizers=(optimizer_cls(params, lr=2e-4, weight_decay=0.01), None),
        )
        collate = trainer.data_collator

        def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(examples)
            trained.append(int((batch["labels"][:, 1:] != -100).sum()))
            tokens.append(int(batch["input_ids"].numel()))  # padding-free: every token is a row's
            return batch

        trainer.data_collator = counting  # the Trainer builds its DataLoader from it in train()
        trainer.train()
    keep = slice(args.warmup, len(times)) if len(times) > args.warmup else slice(None)
    seconds = sum(times[keep])
    return {
        "stack": "TRL SFTTrainer padding_free",
        "step_ms": statistics.median(times[keep]) * 1e3,
        "trained_tok_s": sum(trained[keep]) / seconds,
        "tok_s": sum(tokens[keep]) / seconds,
        "shape": f"1 x <= {preset['batch'] * preset['max_length']} (padding-free)",
        "steps": len(times),
        "step_times_ms": [t * 1e3 for t in times],
    }
