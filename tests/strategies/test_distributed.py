"""QLoRA past one device: DDP, FSDP1 (Lightning's FSDPStrategy) and FSDP2 with 2 real CPU processes (gloo).

One module fixture launches tests/distributed_worker.py twice (rank 0 and 1, externally created processes as
torchrun would) running every scenario in one process group (~35 s on 2 cores, mostly imports); the tests read what
each rank wrote. The single-process reference runs here, with the same data and twice the per-device batch.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_qlora import LoRA, NF4Precision, PagedOptimizerStrategy
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, mark_only_lora_trainable
from lightning_qlora.models.causal_lm import CausalLM
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.quantization.shells import quantize_model
from lightning_qlora.strategies.ddp import PagedDDPStrategy, tensor_checksum
from lightning_qlora.strategies.fsdp import QLoRAFSDPStrategy, check_shardable, qlora_wrap_modules
from lightning_qlora.strategies.fsdp2 import QLoRAFSDP2Strategy
from lightning_qlora.utils.dtypes import to_dtype

WORKER = Path(__file__).parents[1] / "distributed_worker.py"
SCENARIOS = [
    "collectives",
    "ddp",
    "ddp_compiled",
    "ddp_preference",
    "fsdp",
    "fsdp2",
    "fsdp_preference",
    "fsdp2_preference",
    "fsdp_modules",
    "fsdp2_modules",
]
LOSS_REL = 1e-3  # bf16 autocast (where native): the same math batched differently rounds differently (seen: 3e-4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir) -> dict:
    out = tmp_path_factory.mktemp("distributed")
    config = out / "config.json"
    config.write_text(json.dumps({"model_dir": str(tiny_llama_dir), "out": str(out), "scenarios": SCENARIOS}))
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        log = (out / f"log{rank}.txt").open("w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(config)], env=env, stdout=log, stderr=log))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = {}
    for name in SCENARIOS:
        for rank in (0, 1):
            path = out / f"{name}_rank{rank}.json"
            results[name, rank] = json.loads(path.read_text()) if path.exists() else {"error": "no result written"}
    if any(codes):
        tail = (out / "log0.txt").read_text()[-3000:]
        errors = {k: v.get("error") for k, v in results.items() if "error" in v}
        pytest.fail(f"distributed worker failed (exit codes {codes}): {errors}\n{tail}")
    results["out"] = out
    results["logs"] = [(out / f"log{rank}.txt").read_text() for rank in (0, 1)]
    return results


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory) -> dict:
    """One process, global batch 4 (= 2 ranks x 2), same samples, same seed as rank 0."""
    from distributed_worker import CLIP, Record, adapter_sums, loader

    record = Record(seed=100)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        gradient_clip_val=CLIP,
        default_root_dir=tmp_path_factory.mktemp("reference"),
        strategy=PagedOptimizerStrategy(),
        plugins=[NF4Precision()],
        callbacks=[LoRA(r=8, alpha=16, dropout=0.0), record],
    )
    module = CausalLM(model=str(tiny_llama_dir), lr=1e-3)
    with pytest.warns(UserWarning, match="paged optimizers need CUDA"):
        trainer.fit(module, train_dataloaders=loader(batch_size=4))
    return {
        "losses": record.losses,
        "grad_squares": record.grad_squares,
        "start": record.start_adapters,
        "final": adapter_sums(module),
    }


@pytest.fixture(scope="module")
def preference_reference(tiny_llama_dir, tmp_path_factory) -> dict:
    """One process, 4 pairs a step (= 2 ranks x 2) over the union of the ranks' pairs; validation over all 8."""
    from distributed_worker import Record, adapter_sums, preference_loader, preference_module

    record = Record(seed=100)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path_factory.mktemp("preference_reference"), strategy=PagedOptimizerStrategy(),
        plugins=[NF4Precision(compute_dtype="fp32")], callbacks=[LoRA(r=8, alpha=16, dropout=0.0), record],
    )  # fmt: skip
    module = preference_module(str(tiny_llama_dir))
    with pytest.warns(UserWarning, match="paged optimizers need CUDA"):
        trainer.fit(module, train_dataloaders=preference_loader(4), val_dataloaders=preference_loader(4, val=True))
    return {
        "losses": record.losses,
        "start": record.start_adapters,
        "final": adapter_sums(module),
        "adapters": {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k},
        "preference_history": [[step, values] for step, values in module.preference_history],
    }


# --------------------------------------------------------------------------------------------------------- DDP
def test_ddp_all_reduces_only_the_adapters(runs):
    result = runs["ddp", 0]
    adapters = sorted(result["final"])
    assert sorted(result["bucket_names"]) == adapters and len(adapters) == 28  # 2 blocks x 7 layers x (A, B)
    in_plus_out = 128 + 96 + 96 + 128 + 192 + 192 + 192  # q, k, v, o, gate, up, down of one tiny Llama block
    assert result["reducer_bytes"] == result["lora_bytes"] == 2 * in_plus_out * 8 * 4  # 2 blocks, r=8, fp32
    assert result["optimizer"] == "AdamW32bit" and result["optimizer_state_params"] == 28  # paged on CUDA


def test_ddp_ranks_start_from_rank0_adapters_and_identical_4bit_bases(runs):
    r0, r1 = runs["ddp", 0], runs["ddp", 1]
    assert r0["before_wrap"] != r1["before_wrap"]  # each rank drew its own LoRA A ...
    assert r0["after_wrap"] == r1["after_wrap"] == r0["before_wrap"]  # ... DDP's broadcast made them rank 0's
    assert r0["final"] == r1["final"]  # and they stay in lockstep
    assert r0["compared_tensors"] == len(r0["base_sums"]) > 14 * 4  # packed codes + absmax + nested state per layer
    assert r0["base_sums"] == r1["base_sums"]  # every rank quantized the same bits itself


def test_ddp_loss_curve_matches_one_process_with_the_same_global_batch(runs, reference):
    assert runs["ddp", 0]["after_wrap"] == reference["start"]
    assert runs["ddp", 0]["losses"] == runs["ddp", 1]["losses"]  # the logged loss is the mean over ranks
    assert runs["ddp", 0]["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-6)  # same base, same batch
    assert runs["ddp", 0]["losses"] == pytest.approx(reference["losses"], rel=LOSS_REL)
    assert reference["losses"][-1] < reference["losses"][0]  # it trains


def test_ddp_with_compiled_blocks_trains_like_one_eager_process(runs, reference):
    r0, r1 = runs["ddp_compiled", 0], runs["ddp_compiled", 1]
    assert r0["compiled_blocks"] == r1["compiled_blocks"] == 2
    assert r0["graph_breaks"] == r1["graph_breaks"] == {} and not r0["compile_warnings"]
    assert r0["start"] == reference["start"] and r0["final"] == r1["final"]  # replicas in lockstep
    assert r0["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-3)
    assert r0["losses"] == pytest.approx(reference["losses"], rel=LOSS_REL)


def test_ddp_preference_ranks_score_their_own_pairs_and_train_like_one_process(runs, preference_reference):
    """DPO under DDP (reference pass = the same replica, adapters off) equals one process over the union of pairs."""
    from distributed_worker import PAIRS

    r0, r1, ref = runs["ddp_preference", 0], runs["ddp_preference", 1], preference_reference
    assert r0["start"] == r1["start"] == ref["start"]  # rank 0's adapters broadcast, as one process draws them
    assert r0["final"] == r1["final"]  # replicas in lockstep: the same all-reduced gradients on both ranks
    assert len(r0["losses"]) == 3 == PAIRS // 4  # 3 steps of 2 pairs per rank: each pair seen once, on one rank
    assert r0["local_losses"] != r1["local_losses"]  # the ranks scored different pairs ...
    assert r0["losses"] == r1["losses"]  # ... and the logged loss is their mean
    assert r0["losses"][0] == pytest.approx(math.log(2), abs=1e-6) == ref["losses"][0]  # B = 0: policy = reference
    assert r0["losses"] == pytest.approx(ref["losses"], rel=LOSS_REL)
    assert ref["losses"][-1] < 0.9 * ref["losses"][0]  # it trains: the comparison is not of three log 2s
    final = torch.load(runs["out"] / "dpo_final.pt")
    assert sorted(final) == sorted(ref["adapters"])
    for key, value in final.items():  # 3 Adam steps of lr 5e-3: reduction order moves elements by ~1e-6
        torch.testing.assert_close(value, ref["adapters"][key], atol=1e-4, rtol=0)
    # validation: each rank held out 4 of the 8 pairs; the metrics are synchronised to the 8-pair values
    for r in (r0, r1):
        (step, values), ((ref_step, expected),) = r["preference_history"][-1], ref["preference_history"]
        assert step == ref_step == 3 and values.keys() == expected.keys()
        assert values == pytest.approx(expected, rel=LOSS_REL, abs=1e-6), (values, expected)
        assert r["logged"]["val_loss"] == pytest.approx(expected["loss"], rel=LOSS_REL)
        assert r["logged"]["val_rewards/margins"] == pytest.approx(expected["margins"], rel=LOSS_REL, abs=1e-6)


@pytest.mark.parametrize("scenario", ["fsdp_preference", "fsdp2_preference"])
def test_sharded_preference_scores_each_ranks_pairs_and_trains_like_one_process(runs, preference_reference, scenario):
    """DPO under FSDP / FSDP2: the reference pass (adapters off) runs on the sharded 4-bit base like the policy's."""
    r0, r1, ref = runs[scenario, 0], runs[scenario, 1], preference_reference
    assert r0["start"] == r1["start"] == ref["start"]  # rank 0's adapters on every shard
    assert r0["local_losses"] != r1["local_losses"] and r0["losses"] == r1["losses"]
    assert r0["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy = reference, sharded too
    assert r0["losses"] == pytest.approx(ref["losses"], rel=LOSS_REL)
    assert r0["final"] == r1["final"]  # the gathered adapters agree across ranks
    for r in (r0, r1):  # validation synchronised to the 8-pair values
        (step, values), ((_, expected),) = r["preference_history"][-1], ref["preference_history"]
        assert step == 3 and values == pytest.approx(expected, rel=LOSS_REL, abs=1e-6), (values, expected)
        assert r["logged"]["val_loss"] == pytest.approx(expected["loss"], rel=LOSS_REL)


@pytest.mark.parametrize("scenario", ["fsdp_modules", "fsdp2_modules"])
def test_sharded_export_holds_the_gathered_trained_head_as_modules_to_save(runs, scenario):
    from safetensors.torch import load_file

    r0, r1 = runs[scenario, 0], runs[scenario, 1]
    assert r0["head_sum"] == r1["head_sum"] and r0["adapters"] == r1["adapters"] and r0["losses"] == r1["losses"]
    tensors = load_file(runs["out"] / f"{scenario}_peft" / "adapter_model.safetensors")
    head = [k for k in tensors if "lm_head" in k]
    assert head == ["base_model.model.lm_head.modules_to_save.weight"] or head == ["base_model.model.lm_head.weight"]
    assert list(tensors[head[0]].shape) == r0["head_shape"]  # the full head, not rank 0's shard
    assert int(tensor_checksum(tensors[head[0]].float())) == r0["head_sum"]  # the trained values
    for key, checksum in r0["adapters"].items():
        peft_key = "base_model.model." + key.removeprefix("model.") + ".weight"
        assert int(tensor_checksum(tensors[peft_key].float())) == checksum, key


def test_ddp_checkpoint_and_peft_export_are_written_once_by_rank0(runs):
    out = runs["out"]
    final = torch.load(out / "ddp_final.pt")
    ckpt_path = Path(runs["ddp", 0]["ckpt"])
    assert [p.name for p in ckpt_path.parent.glob("*ckpt*")] == [ckpt_path.name]  # no temp or duplicate files
    checkpoint = torch.load(ckpt_path, weights_only=True)
    assert sorted(checkpoint["state_dict"]) == sorted(final)  # adapter-only
    for key, value in final.items():
        assert torch.equal(checkpoint["state_dict"][key], value)
    assert checkpoint["lightning_qlora"]["trainable_keys"] == sorted(final)

    from safetensors.torch import load_file

    exported = load_file(out / "ddp_peft" / "adapter_model.safetensors")
    assert len(exported) == len(final)
    for key, value in final.items():
        peft_key = "base_model.model." + key.removeprefix("model.") + ".weight"
        assert torch.equal(exported[peft_key], value)
    assert "PEFT adapter written" in runs["logs"][0] and "PEFT adapter written" not in runs["logs"][1]


def test_lm_eval_callback_finishes_on_both_ranks_with_rank0_numbers(runs):
    r0, r1 = runs["ddp", 0]["lm_eval_metrics"], runs["ddp", 1]["lm_eval_metrics"]
    assert "lm_eval/qlora_demo_mc/acc" in r0 and r0 == r1  # rank 1 waited and received rank 0's metrics


# -------------------------------------------------------------------------------------------------------- FSDP
@pytest.mark.parametrize("scenario", ["fsdp", "fsdp2"])
def test_fsdp_trains_like_one_process_without_state_for_frozen_params(runs, reference, scenario):
    r0, r1 = runs[scenario, 0], runs[scenario, 1]
    assert r0["after_wrap"] == r1["after_wrap"] == reference["start"]  # rank 0's adapters on every shard
    assert r0["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-6)
    assert r0["losses"] == pytest.approx(reference["losses"], rel=LOSS_REL)
    assert r0["losses"] == r1["losses"]
    for r in (r0, r1):
        assert r["state_params_all_trainable"] and 0 < r["state_params"] <= r["trainable_params"] == 28


def test_gradient_clipping_uses_the_norm_over_all_ranks(runs, reference):
    from distributed_worker import CLIP

    norms = {"reference": [math.sqrt(s) for s in reference["grad_squares"]]}
    norms["ddp"] = [math.sqrt(s) for s in runs["ddp", 0]["grad_squares"]]  # replicated gradients
    for scenario in ("fsdp", "fsdp2"):  # each rank holds a shard: the norm is over both
        norms[scenario] = [math.sqrt(a + b) for a, b in zip(*(runs[scenario, r]["grad_squares"] for r in (0, 1)))]
    for name, values in norms.items():
        assert values == pytest.approx([CLIP] * 3, rel=1e-3), name  # clipped to exactly CLIP every step


@pytest.mark.parametrize("scenario", ["fsdp", "fsdp2"])
def test_fsdp_adapter_only_sharded_checkpoint_resumes(runs, scenario):
    from torch.distributed.checkpoint import FileSystemReader

    r0, r1 = runs[scenario, 0], runs[scenario, 1]
    folder = Path(r0["ckpt"])
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    keys = list(FileSystemReader(folder).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if not k.startswith("optimizer")]
    assert len(model_keys) == 28 and all(k.endswith(("lora_A", "lora_B")) for k in model_keys)  # no base weight
    assert any(k.startswith("optimizer_0") for k in keys)
    for r in (r0, r1):
        assert r["resumed_start_adapters"] == r["end_adapters"]  # adapters restored exactly
        assert r["resumed_global_step"] == 5 and r["resumed_optimizer_step"] == 5  # optimizer state too
        assert len(r["resumed_losses"]) == 2


@pytest.mark.parametrize("scenario", ["fsdp", "fsdp2"])
def test_fsdp_peft_export_has_full_adapters_under_plain_names(runs, scenario):
    from safetensors.torch import load_file

    out = runs["out"]
    ddp = load_file(out / "ddp_peft" / "adapter_model.safetensors")
    sharded = load_file(out / f"{scenario}_peft" / "adapter_model.safetensors")
    assert sorted(sharded) == sorted(ddp)  # same keys: no FSDP wrapper prefixes, full shapes
    for key, checksum in runs[scenario, 0]["end_adapters"].items():  # exactly the trained (gathered) adapters
        peft_key = "base_model.model." + key.removeprefix("model.") + ".weight"
        assert int(tensor_checksum(sharded[peft_key].float())) == checksum, key
    for key, value in ddp.items():
        assert sharded[key].shape == value.shape
        # same training as DDP up to reduction order; each of the 3 Adam steps moves an element by at most ~lr = 1e-3
        torch.testing.assert_close(sharded[key], value, atol=6e-3, rtol=0)


def test_packed_nf4_bytes_survive_gloo_collectives_and_fsdp2_round_trips(runs):
    for rank in (0, 1):
        result = runs["collectives", rank]
        assert result["nan_patterns"] == 254  # every bf16 NaN bit pattern was sent
        for check in ("all_gather", "all_gather_into_tensor", "broadcast", "fsdp2_no_cast", "fsdp2_bf16"):
            assert result[check] is True, check
        assert result["packed_nan_values"] > 0  # real packed NF4 codes read as bf16 do contain NaNs ...
        assert result["fsdp2_packed_bytes"] is True  # ... and come back bit-exact from the shards
        assert result["fsdp2_dequant_max_err"] == 0.0 and result["fsdp2_forward_max_err"] == 0.0


# ------------------------------------------------------------------------------------------ single-process units
def test_tensor_checksum_sees_every_bit():
    from distributed_worker import all_bf16_bit_patterns

    patterns = all_bf16_bit_patterns()
    flipped = patterns.clone()
    raw = flipped.view(torch.int16)
    nan_index = int(torch.isnan(patterns).nonzero()[0])
    raw[nan_index] ^= 2  # another NaN payload: equal as a float (both NaN), different bits
    assert torch.isnan(flipped[nan_index])
    assert tensor_checksum(patterns) == tensor_checksum(patterns.clone())
    assert tensor_checksum(patterns) != tensor_checksum(flipped)
    assert tensor_checksum(patterns) != tensor_checksum(patterns.flip(0))  # same bytes, other order


def _quantized_llama(storage: torch.dtype):
    from conftest import build_tiny_llama

    model = build_tiny_llama().to(torch.bfloat16)
    quantize_model(model, QuantizationConfig(quant_storage=storage), "cpu")
    inject_lora(model, LoRAConfig(r=8))
    mark_only_lora_trainable(model)
    return model


def _own_parameters(module: nn.Module, units: list[nn.Module]) -> list[torch.Tensor]:
    """What FSDP1 flattens into ``module``'s unit: its parameters outside the nested units."""
    params = list(module.parameters(recurse=False))
    for child in module.children():
        if not any(child is u for u in units):
            params += _own_parameters(child, units)
    return params


def test_fsdp_needs_float_storage_and_wraps_units_of_one_dtype():
    with pytest.raises(ValueError, match=r"stored as torch.uint8.*quant_storage"):
        check_shardable(_quantized_llama(torch.uint8))
    model = _quantized_llama(torch.bfloat16)
    assert check_shardable(model) == 14
    units = qlora_wrap_modules(model)
    assert len(units) == 14 + 14 + 2  # 4-bit layers, LoRA layers (adapters only), decoder blocks
    dtypes = {f"{type(u).__name__}#{i}": {p.dtype for p in _own_parameters(u, units)} for i, u in enumerate(units)}
    dtypes["root"] = {p.dtype for p in _own_parameters(model, units)}
    assert all(len(d) == 1 for d in dtypes.values()), dtypes  # FSDP1 refuses to flatten mixed dtypes together
    assert {torch.float32} in dtypes.values() and {torch.bfloat16} in dtypes.values()  # fp32 adapters, bf16 rest


def test_fsdp_strategies_take_nf4_precision_and_make_its_storage_shardable():
    from lightning.pytorch.plugins.precision import HalfPrecision

    with pytest.raises(TypeError, match="NF4Precision or FSDPPrecision, got HalfPrecision"):
        QLoRAFSDPStrategy().precision_plugin = HalfPrecision("bf16-true")
    for strategy_cls in (QLoRAFSDPStrategy, QLoRAFSDP2Strategy):
        for compute in ("bf16", "fp16", "auto"):
            plugin = NF4Precision(compute_dtype=compute)  # uint8 storage, as in single-GPU recipes
            strategy_cls().precision_plugin = plugin
            assert plugin.config.quant_storage == plugin.config.compute_dtype == to_dtype(compute)


def test_lightning_fsdp_refuses_cpu_but_ours_is_accepted():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), logger=False)
    for strategy in ("paged_ddp", "qlora_fsdp", "qlora_fsdp2"):  # registered names, for `--trainer.strategy=...`
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, plugins=[NF4Precision()], logger=False)
        assert isinstance(trainer.strategy, (PagedDDPStrategy, QLoRAFSDPStrategy, QLoRAFSDP2Strategy))


def test_sharded_strategies_refuse_rank0_only_evaluation():
    from lightning_qlora.evaluation import DEMO_TASK, LMEvalCallback

    for strategy in (QLoRAFSDPStrategy(), QLoRAFSDP2Strategy()):
        callback = LMEvalCallback(tasks=[DEMO_TASK])
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, callbacks=[callback], logger=False)
        with pytest.raises(ValueError, match=r"LMEvalCallback runs the model on rank 0 alone.*paged_ddp"):
            callback.setup(trainer, pl.LightningModule(), "fit")


def test_lora_state_dict_names_survive_fsdp_wrapper_prefixes():
    from lightning_qlora.utils.modules import unwrapped_name

    wrapped = "model.layers.0._fsdp_wrapped_module.self_attn.q_proj._fsdp_wrapped_module.lora_A"
    assert unwrapped_name(wrapped) == "model.layers.0.self_attn.q_proj.lora_A"
