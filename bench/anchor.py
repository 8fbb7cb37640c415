"""Stack (b), the anchor: HF transformers + peft + bitsandbytes, line for line as ``anchor_hf_peft_bnb.py``.

``from_pretrained`` with ``BitsAndBytesConfig`` (NF4 + double quant, bf16 compute), ``prepare_model_for_kbit_training``
with gradient checkpointing, peft LoRA on all linear layers, ``model.train()``, bitsandbytes ``PagedAdamW32bit``
(``AdamW32bit`` on CPU, where paging does not exist, as our strategy falls back too), bf16 autocast, a plain loop.
"""

from __future__ import annotations

import gc
import time

import torch
from measure import GIB, ForwardCounter, MemoryProbe, Row, checkpointing_on, memory_now_gib, summarize, sync
from workloads import LORA, LR, Workload, make_batches

NAME = "anchor (HF+peft+bnb)"


def run_anchor(w: Workload, peak_tflops: float | None, isolated: bool) -> Row:
    """HF + peft + bitsandbytes, line for line as in the anchor script (CPU: device_map cpu, unpaged AdamW32bit)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    probe = MemoryProbe(w.device)
    probe.reset()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[w.compute_dtype]
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    device_map = {"": 0} if w.device == "cuda" else {"": "cpu"}
    model = LlamaForCausalLM.from_pretrained(w.model_dir, dtype=dtype, device_map=device_map, quantization_config=quant)
    loaded_gib = memory_now_gib(w.device)  # where the anchor script reads "weights"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=w.checkpoint_mode != "none")
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=w.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # paged optimizers need CUDA: on CPU the unpaged class (same math), as lightning_qlora's strategy does
    opt_cls = bnb.optim.PagedAdamW32bit if w.device == "cuda" else bnb.optim.AdamW32bit
    opt = opt_cls(params, lr=LR)
    counter = ForwardCounter(model)
    before_first_step = memory_now_gib(w.device)
    times, losses, calls = [], [], []
    for batch in make_batches(w):
        ids = batch["input_ids"].to(w.device)
        before = counter.calls
        sync(w.device)
        t = time.perf_counter()
        with torch.autocast(w.device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(w.device)
        times.append(time.perf_counter() - t)
        probe.sample()
        losses.append(float(loss.detach()))
        calls.append(counter.calls - before)
    counter.remove()
    row = summarize(
        NAME,
        w,
        times,
        losses,
        probe,
        peak_tflops,
        optimizer=type(opt).__name__,
        gc_forward_calls=calls,
        train_mode=model.training,
        isolated=isolated,
        extra={
            "weights_loaded_gib": loaded_gib,
            "before_first_step_gib": before_first_step,
            "trainable_params": sum(p.numel() for p in params),
            "gradient_checkpointing": checkpointing_on(model.base_model.model),
            "device_used_before_gib": probe.used_before / GIB if w.device == "cuda" else None,
        },
    )
    del model, opt, params, loss
    gc.collect()
    if w.device == "cuda":
        torch.cuda.empty_cache()
    return row
