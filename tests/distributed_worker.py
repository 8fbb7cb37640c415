"""One rank of the 2-process CPU (gloo) runs behind tests/strategies/test_distributed.py.

Launched by the test as ``python tests/distributed_worker.py <config.json>`` once per rank with ``LOCAL_RANK``,
``NODE_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (so Lightning sees externally created
processes and launches nothing itself). Runs the scenarios listed in the config one after the other in the same
process group and writes ``<out>/<scenario>_rank<r>.json`` with what the tests check; an exception is recorded there
instead of crashing the other scenarios.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_qlora import LoRA, NF4Precision  # noqa: E402
from lightning_qlora.lora.layer import lora_state_dict  # noqa: E402
from lightning_qlora.models.causal_lm import CausalLM  # noqa: E402
from lightning_qlora.models.preference import PreferenceLM  # noqa: E402
from lightning_qlora.strategies.ddp import (  # noqa: E402
    PagedDDPStrategy,
    replica_checksums,
    tensor_checksum,
)

SEQ = 16
CLIP = 0.05  # small enough to clip every step: checks that the norm is taken over all ranks' shards


def all_bf16_bit_patterns() -> torch.Tensor:
    """Every 16-bit pattern once, viewed as bf16: 65536 values, 254 of them NaNs (exponent all ones, mantissa != 0).

    Packed 4-bit codes stored as bf16 can form any of them; a byte-exact transport must return them unchanged.
    """
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def ddp_bucket_parameter_names(wrapped: torch.nn.parallel.DistributedDataParallel) -> list[str]:
    """Names (in ``wrapped.module``'s naming) of the parameters DDP's reducer all-reduces, as DDP selects them."""
    reduced = {id(p) for p in wrapped._build_params_for_reducer()[0]}
    return [name for name, param in wrapped.module.named_parameters() if id(param) in reduced]


def token_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` equal-length samples (no padding), so a mean over ranks equals the mean over the global batch."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (n, SEQ), generator=gen)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def loader(batch_size: int, rank: int = 0, world_size: int = 1, n: int = 12) -> torch.utils.data.DataLoader:
    """Samples ``rank, rank + world_size, ...`` in order: step k of 2 ranks x b covers what step k of 1 x 2b does.

    (Lightning's automatic ``DistributedSampler`` always shuffles training data, so the tests shard it themselves.)
    """
    subset = torch.utils.data.Subset(token_batches(n), list(range(rank, n, world_size)))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)


PAIRS, VAL_PAIRS = 12, 8
PROMPT = 6  # tokens of each pair's prompt, shared by its chosen and rejected sequences and never scored


def preference_pairs(n: int, seed: int) -> list[dict]:
    """``n`` pairs of equal-length sequences (no padding), as :class:`PreferenceDataModule` examples.

    Chosen responses draw their tokens from ``[10, 14)``, rejected ones from ``[400, 404)``: a preference that
    carries over to pairs not trained on, so the loss of each new batch falls.
    """
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(4, 512, (PROMPT,), generator=gen).tolist()
        sides = {}
        for side, (low, high) in (("chosen", (10, 14)), ("rejected", (400, 404))):
            response = torch.randint(low, high, (SEQ - PROMPT,), generator=gen).tolist()
            sides[f"{side}_input_ids"] = prompt + response
            sides[f"{side}_labels"] = [-100] * PROMPT + response
        pairs.append({**sides, "index": i})
    return pairs


def preference_loader(
    pairs_per_batch: int, rank: int = 0, world_size: int = 1, val: bool = False
) -> torch.utils.data.DataLoader:
    """Pairs ``rank, rank + world_size, ...`` in order (each rank sees its own pairs), ``2B`` rows per batch."""
    from lightning_qlora.data.preference import PreferenceCollator

    pairs = preference_pairs(VAL_PAIRS, seed=2) if val else preference_pairs(PAIRS, seed=1)
    subset = torch.utils.data.Subset(pairs, list(range(rank, len(pairs), world_size)))
    return torch.utils.data.DataLoader(subset, batch_size=pairs_per_batch, collate_fn=PreferenceCollator(pad_id=3))


def preference_module(model_dir: str) -> PreferenceLM:
    """DPO with a large enough step that 3 steps move the loss well away from log 2 (its value at B = 0).

    fp32 throughout (with ``NF4Precision(compute_dtype="fp32")``): DPO's loss near 0.1 turns bf16 round-off of the
    margins into ~1e-2 relative differences between batchings, on CPUs where ``auto`` picks bf16.
    """
    return PreferenceLM(model=model_dir, method="dpo", beta=0.5, lr=5e-3, dtype="fp32")


def adapter_sums(module: torch.nn.Module) -> dict[str, int]:
    """Checksums of the full adapter tensors (FSDP2 ``DTensor`` shards gathered: a collective there)."""
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sorted(lora_state_dict(module).items())}
    return {k: int(tensor_checksum(v.float())) for k, v in full.items()}


class Record(pl.Callback):
    """Rank-seeded adapter init, the global mean loss per step, and what the strategy saw before/after wrapping."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.losses: list[float] = []
        self.local_losses: list[float] = []
        self.grad_squares: list[float] = []
        self.start_adapters: dict[str, int] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.manual_seed(self.seed + trainer.global_rank)  # a different LoRA A init on every rank

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_adapters = full_adapter_sums(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.local_losses.append(float(outputs["loss"]))
        squares = sum(  # after clipping and the optimizer step: the gradients the step used, this rank's part
            float((g.to_local() if hasattr(g, "to_local") else g).float().pow(2).sum())
            for p in pl_module.parameters()
            if p.requires_grad and (g := p.grad) is not None
        )
        self.grad_squares.append(squares)
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self.losses.append(float(loss))


def full_adapter_sums(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int]:
    full = getattr(trainer.strategy, "full_module_context", None)
    if full is None:
        return adapter_sums(pl_module)
    with full():
        return adapter_sums(pl_module)


class RecordingDDP(PagedDDPStrategy):
    """Keeps the adapters' checksums right before DDP wraps the model, and which parameters DDP reduces."""

    def _setup_model(self, model):
        self.before_wrap = adapter_sums(model)
        wrapped = super()._setup_model(model)
        self.bucket_names = ddp_bucket_parameter_names(wrapped)
        self.reducer_bytes = int(wrapped._get_ddp_logging_data().get("total_parameter_size_bytes", -1))
        return wrapped


def trainer_kwargs(out: Path, **extra) -> dict:
    kw = dict(
        accelerator="cpu",
        devices=2,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
        use_distributed_sampler=False,
        gradient_clip_val=CLIP,
    )
    kw.update(extra)
    return kw


def run_ddp(cfg: dict, out: Path, rank: int) -> dict:
    from lightning_qlora.evaluation import DEMO_TASK, LMEvalCallback

    record = Record(seed=100)
    strategy = RecordingDDP(optimizer="paged_adamw_32bit")
    lm_eval = LMEvalCallback(tasks=[DEMO_TASK], num_fewshot=0, limit=2, batch_size=2, on_fit_end=True)
    ckpt = ModelCheckpoint(dirpath=out / "ddp_ckpt", filename="last-{step}")
    lora = LoRA(r=8, alpha=16, dropout=0.0, export_dir=str(out / "ddp_peft"))
    trainer = pl.Trainer(
        **trainer_kwargs(out, strategy=strategy, plugins=[NF4Precision()], callbacks=[lora, record, ckpt, lm_eval])
    )
    module = CausalLM(model=cfg["model_dir"], lr=1e-3)
    trainer.fit(module, train_dataloaders=loader(batch_size=2, rank=rank, world_size=2))
    names, base_sums = replica_checksums(module.model)
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in lora_state_dict(module).items()}, out / "ddp_final.pt")
    return {
        "losses": record.losses,
        "grad_squares": record.grad_squares,
        "local_losses": record.local_losses,
        "before_wrap": strategy.before_wrap,
        "after_wrap": record.start_adapters,
        "final": adapter_sums(module),
        "bucket_names": strategy.bucket_names,
        "reducer_bytes": strategy.reducer_bytes,
        "lora_bytes": sum(v.numel() * v.element_size() for v in lora_state_dict(module).values()),
        "compared_tensors": strategy.compared_tensors,
        "base_sums": dict(zip(names, [int(s) for s in base_sums], strict=True)),
        "optimizer": type(strategy.optimizers[0]).__name__,
        "optimizer_state_params": len(strategy.optimizers[0].state),
        "lm_eval_metrics": lm_eval.last_metrics,
        "ckpt": str(ckpt.best_model_path or ckpt.last_model_path),
    }


def run_preference(cfg: dict, out: Path, rank: int, name: str, strategy: pl.strategies.Strategy) -> dict:
    """DPO under ``strategy``: each rank scores its own pairs (reference pass included), validation over both ranks'."""
    record = Record(seed=100)
    lora = LoRA(r=8, alpha=16, dropout=0.0)
    # fp32 throughout (see preference_module); "auto" storage: the compute dtype, so FSDP can shard the codes
    plugins = [NF4Precision(compute_dtype="fp32", quant_storage="auto")]
    kwargs = trainer_kwargs(out, strategy=strategy, plugins=plugins, callbacks=[lora, record])
    trainer = pl.Trainer(**{**kwargs, "gradient_clip_val": None}, enable_checkpointing=False)
    module = preference_module(cfg["model_dir"])
    train = preference_loader(2, rank=rank, world_size=2)  # 3 batches of 2 pairs: one epoch, validated at its end
    trainer.fit(module, train_dataloaders=train, val_dataloaders=preference_loader(2, rank, 2, val=True))
    if rank == 0 and name == "ddp":
        torch.save({k: v.detach().clone() for k, v in lora_state_dict(module).items()}, out / "dpo_final.pt")
    return {
        "losses": record.losses,
        "local_losses": record.local_losses,
        "start": record.start_adapters,
        "final": full_adapter_sums(trainer, module),
        "preference_history": module.preference_history,
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")},
    }


def run_ddp_preference(cfg: dict, out: Path, rank: int) -> dict:
    return run_preference(cfg, out, rank, "ddp", PagedDDPStrategy())


def run_fsdp_preference(cfg: dict, out: Path, rank: int) -> dict:
    from lightning_qlora.strategies.fsdp import QLoRAFSDPStrategy

    return run_preference(cfg, out, rank, "fsdp", QLoRAFSDPStrategy())


def run_fsdp2_preference(cfg: dict, out: Path, rank: int) -> dict:
    from lightning_qlora.strategies.fsdp2 import QLoRAFSDP2Strategy

    return run_preference(cfg, out, rank, "fsdp2", QLoRAFSDP2Strategy())


def run_ddp_compiled(cfg: dict, out: Path, rank: int) -> dict:
    """DDP with ``LoRA(compile_blocks=True)``: the same training as the reference process, with compiled blocks."""
    import warnings

    from torch._dynamo.utils import counters

    from lightning_qlora.models.compilation import is_compiled

    record = Record(seed=100)
    # aot_eager: dynamo's capture and AOT autograd under DDP, without Inductor's code generation (tens of seconds per
    # rank on 2 cores); Inductor's numbers are checked in one process by tests/models/test_compilation.py
    lora = LoRA(r=8, alpha=16, dropout=0.0, compile_blocks=True, compile_kwargs={"backend": "aot_eager"})
    kwargs = trainer_kwargs(out, strategy=PagedDDPStrategy(), plugins=[NF4Precision()], callbacks=[lora, record])
    trainer = pl.Trainer(**kwargs, enable_checkpointing=False)
    module = CausalLM(model=cfg["model_dir"], lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=loader(batch_size=2, rank=rank, world_size=2))
    return {
        "losses": record.losses,
        "start": record.start_adapters,
        "final": adapter_sums(module),
        "compiled_blocks": sum(1 for m in module.modules() if is_compiled(m)),
        "graph_breaks": {str(k): v for k, v in counters["graph_break"].items()},
        "compile_warnings": [str(w.message) for w in caught if "compile" in str(w.message)],
    }


def run_sharded(cfg: dict, out: Path, rank: int, name: str, make_strategy) -> dict:
    """Train 3 steps under a sharded strategy with sharded checkpoints, then resume to step 5 from the last one."""

    def fit(max_steps: int, ckpt_path: str | None, callbacks: list) -> tuple[pl.Trainer, CausalLM, Record]:
        record = Record(seed=100)
        export = str(out / f"{name}_peft") if ckpt_path is None else None  # the first run's adapters are checked
        lora = LoRA(r=8, alpha=16, dropout=0.0, export_dir=export)
        trainer = pl.Trainer(
            **trainer_kwargs(
                out,
                max_steps=max_steps,
                strategy=make_strategy(),
                plugins=[NF4Precision(quant_storage="auto")],
                callbacks=[lora, record, *callbacks],
                enable_checkpointing=bool(callbacks),
            )
        )
        module = CausalLM(model=cfg["model_dir"], lr=1e-3)
        trainer.fit(module, train_dataloaders=loader(batch_size=2, rank=rank, world_size=2), ckpt_path=ckpt_path)
        return trainer, module, record

    ckpt = ModelCheckpoint(dirpath=out / f"{name}_ckpt", filename="sharded-{step}")
    trainer, module, record = fit(3, None, [ckpt])
    optimizer = trainer.strategy.optimizers[0]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    first = {
        "losses": record.losses,
        "grad_squares": record.grad_squares,
        "after_wrap": record.start_adapters,
        "state_params_all_trainable": all(id(p) in trainable for p in optimizer.state),
        "state_params": len(optimizer.state),
        "trainable_params": len(trainable),
        "ckpt": str(ckpt.last_model_path or ckpt.best_model_path),
        "end_adapters": full_adapter_sums(trainer, module),
    }
    trainer2, module2, record2 = fit(5, first["ckpt"], [])
    return {
        **first,
        "resumed_start_adapters": record2.start_adapters,
        "resumed_losses": record2.losses,
        "resumed_global_step": trainer2.global_step,
        "resumed_optimizer_step": int(next(iter(trainer2.strategy.optimizers[0].state.values()))["step"]),
    }


def run_fsdp(cfg: dict, out: Path, rank: int) -> dict:
    from lightning_qlora.strategies.fsdp import QLoRAFSDPStrategy

    return run_sharded(cfg, out, rank, "fsdp", lambda: QLoRAFSDPStrategy(state_dict_type="sharded"))


def run_fsdp2(cfg: dict, out: Path, rank: int) -> dict:
    from lightning_qlora.strategies.fsdp2 import QLoRAFSDP2Strategy

    return run_sharded(cfg, out, rank, "fsdp2", QLoRAFSDP2Strategy)


def run_sharded_modules(cfg: dict, out: Path, rank: int, name: str, strategy: pl.strategies.Strategy) -> dict:
    """A sharded run with a trained head (``trainable_modules``): the PEFT export holds the gathered head, as peft's
    ``modules_to_save``, next to the gathered adapters."""
    record = Record(seed=100)
    lora = LoRA(r=8, alpha=16, dropout=0.0, trainable_modules=["lm_head"], export_dir=str(out / f"{name}_peft"))
    kwargs = trainer_kwargs(out, strategy=strategy, plugins=[NF4Precision(quant_storage="auto")],
                            callbacks=[lora, record])  # fmt: skip
    trainer = pl.Trainer(**kwargs, enable_checkpointing=False)
    module = CausalLM(model=cfg["model_dir"], lr=1e-3)
    trainer.fit(module, train_dataloaders=loader(batch_size=2, rank=rank, world_size=2))
    full = trainer.strategy.full_module_context
    with full():
        head = module.model.lm_head.weight
        head = head.full_tensor() if hasattr(head, "full_tensor") else head
        head_sum = int(tensor_checksum(head.detach().float()))
        head_shape = list(head.shape)
    return {"losses": record.losses, "head_sum": head_sum, "head_shape": head_shape,
            "adapters": full_adapter_sums(trainer, module)}  # fmt: skip


def run_fsdp_modules(cfg: dict, out: Path, rank: int) -> dict:
    from lightning_qlora.strategies.fsdp import QLoRAFSDPStrategy

    return run_sharded_modules(cfg, out, rank, "fsdp_modules", QLoRAFSDPStrategy())


def run_fsdp2_modules(cfg: dict, out: Path, rank: int) -> dict:
    from lightning_qlora.strategies.fsdp2 import QLoRAFSDP2Strategy

    return run_sharded_modules(cfg, out, rank, "fsdp2_modules", QLoRAFSDP2Strategy())


def run_collectives(cfg: dict, out: Path, rank: int) -> dict:
    """Packed NF4 bytes viewed as bf16 (every bit pattern, NaNs included) through gloo collectives and FSDP2."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight
    from lightning_qlora.quantization.shells import quantize_model
    from lightning_qlora.strategies.fsdp2 import fully_shard_qlora, unsharded

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a.detach().reshape(-1).view(torch.int16), b.detach().reshape(-1).view(torch.int16))

    patterns = all_bf16_bit_patterns()
    result: dict = {"nan_patterns": int(torch.isnan(patterns).sum())}
    gathered = [torch.empty_like(patterns) for _ in range(2)]
    dist.all_gather(gathered, patterns)
    result["all_gather"] = all(same(g, patterns) for g in gathered)
    flat = torch.empty(2 * patterns.numel(), dtype=patterns.dtype)
    dist.all_gather_into_tensor(flat, patterns)
    halves = flat.split(patterns.numel())
    result["all_gather_into_tensor"] = same(halves[0], patterns) and same(halves[1], patterns)
    sent = patterns.clone() if rank == 0 else torch.zeros_like(patterns)
    dist.broadcast(sent, src=0)
    result["broadcast"] = same(sent, patterns)

    # FSDP2: a frozen bf16 parameter holding every pattern, sharded on dim 0, gathered back, twice
    policies = {"fsdp2_no_cast": MixedPrecisionPolicy(), "fsdp2_bf16": MixedPrecisionPolicy(torch.bfloat16)}
    for label, policy in policies.items():
        holder = torch.nn.Linear(256, 256, bias=False, dtype=torch.bfloat16)
        holder.weight = torch.nn.Parameter(patterns.clone().reshape(256, 256), requires_grad=False)
        fully_shard(holder, mp_policy=policy)
        local = holder.weight.to_local()
        ok = same(local, patterns.reshape(256, 256)[rank * 128 : (rank + 1) * 128])
        for _ in range(2):
            holder.unshard()
            ok = ok and same(holder.weight, patterns)
            holder.reshard()
        result[label] = ok

    # a real NF4 layer stored as bf16: packed codes survive fully_shard_qlora, dequantization matches bitsandbytes'
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    quantize_model(net, QuantizationConfig(quant_storage=torch.bfloat16, skip_modules=()), "cpu")
    packed = [m.weight.detach().clone() for m in net if hasattr(m, "quant_state")]
    reference = [dequantize_weight(m) for m in net if hasattr(m, "quant_state")]
    result["packed_nan_values"] = int(sum(torch.isnan(p).sum() for p in packed))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    expected = net(x).detach()
    fully_shard_qlora(net)
    got = net(x).detach()
    with unsharded(net):
        layers = [m for m in net if hasattr(m, "quant_state")]
        result["fsdp2_packed_bytes"] = all(same(m.weight, p) for m, p in zip(layers, packed, strict=True))
        from bitsandbytes.functional import dequantize_4bit

        result["fsdp2_dequant_max_err"] = max(
            float((dequantize_4bit(m.weight.detach(), m.quant_state).float() - r).abs().max())
            for m, r in zip(layers, reference, strict=True)
        )
    result["fsdp2_forward_max_err"] = float((got - expected).abs().max())
    result["reference_dequant_absmax"] = float(max(r.abs().max() for r in reference))
    return result


SCENARIOS = {
    "ddp": run_ddp,
    "ddp_compiled": run_ddp_compiled,
    "ddp_preference": run_ddp_preference,
    "fsdp_preference": run_fsdp_preference,
    "fsdp2_preference": run_fsdp2_preference,
    "fsdp_modules": run_fsdp_modules,
    "fsdp2_modules": run_fsdp2_modules,
    "fsdp": run_fsdp,
    "fsdp2": run_fsdp2,
    "collectives": run_collectives,
}


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(cfg["out"])
    rank = int(os.environ["LOCAL_RANK"])
    import lm_eval.evaluator

    lm_eval.evaluator.add_env_info = lambda results: None  # skips a `pip list` per evaluation
    # one gloo process group for all scenarios (Lightning reuses an initialised one)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    for name in cfg["scenarios"]:
        start = time.perf_counter()
        try:
            result = SCENARIOS[name](cfg, out, rank)
            result["seconds"] = round(time.perf_counter() - start, 1)
        except Exception as err:  # recorded for the test; the other rank may hang, the test's timeout ends it
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        (out / f"{name}_rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
        if "error" in result:
            sys.exit(1)


if __name__ == "__main__":
    main()
