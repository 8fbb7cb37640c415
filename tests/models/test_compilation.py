"""Regional torch.compile of the blocks: same numbers as eager, no graph break, checkpointing and codes kept."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import build_tiny_llama
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from lightning_qlora import CausalLM, LoRA, NF4Precision, PagedOptimizerStrategy, compile_blocks
from lightning_qlora.callbacks.lora import refuse_sharded_compile
from lightning_qlora.lora.dropout import pack_mask, unpack_mask
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_state_dict, mark_only_lora_trainable
from lightning_qlora.models.checkpointing import enable_gradient_checkpointing
from lightning_qlora.models.compilation import graph_break_counts, graph_break_report, is_compiled
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.quantization.shells import quantize_model

VOCAB = 512


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def adapted_llama(dropout: float, checkpointing: str | None, compiled: bool, layers: int = 2):
    model = build_tiny_llama(num_hidden_layers=layers, attn_implementation="sdpa")
    quantize_model(model, QuantizationConfig(compute_dtype=torch.float32))  # fp32 throughout: tight comparisons
    inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=dropout))
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    if checkpointing:
        enable_gradient_checkpointing(model, checkpointing)
    model.train()
    if compiled:
        assert compile_blocks(model) == layers
    return model


def ids(batch: int = 2, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, tokens, seed: int = 7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_codes(model) -> dict[str, bytes]:
    return {
        n: bytes(p.data.view(torch.uint8).flatten().tolist())
        for n, p in model.named_parameters()
        if p.dtype == torch.uint8
    }


def mask_round_trip(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    packed = pack_mask(mask)
    return packed, unpack_mask(packed, mask.shape)


@pytest.mark.parametrize("shape", [(5, 8), (3, 7)], ids=["multiple-of-8", "padded"])
def test_compiled_mask_packing_gives_the_eager_bits(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    packed, unpacked = torch.compile(mask_round_trip, dynamic=False)(mask)  # one compile packs and unpacks
    assert torch.equal(packed, pack_mask(mask))
    assert torch.equal(unpack_mask(pack_mask(mask), mask.shape), mask)
    assert torch.equal(unpacked, mask)


def test_compiled_blocks_give_eagers_loss_and_grads_after_an_eval_pass():
    """fp32, no dropout: compiled and eager compute the same function; one graph serves both layers."""
    eager = adapted_llama(0.0, "full", compiled=False)
    compiled = adapted_llama(0.0, "full", compiled=True)
    for name, value in lora_state_dict(eager).items():  # built from the same seeds: the same model
        assert torch.equal(lora_state_dict(compiled)[name], value), name
    codes = packed_codes(compiled)
    tokens = ids()
    compiled.eval()  # a validation pass first, as Lightning's (inference mode): bitsandbytes' CPU repack would
    with torch.inference_mode():  # corrupt later backward passes
        eval_loss = compiled(input_ids=tokens, labels=tokens).loss.clone()
    compiled.train()
    expected_loss, expected = loss_and_grads(eager, tokens)
    for _ in range(2):  # the second step reuses the compiled graph
        loss, grads = loss_and_grads(compiled, tokens)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected.keys() and len(grads) == 2 * 7 * 2
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(eval_loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert counters["graph_break"] == {}, dict(counters["graph_break"])
    assert all(is_compiled(layer) for layer in compiled.model.layers)
    assert packed_codes(compiled) == codes
    assert lora_state_dict(compiled).keys() == lora_state_dict(eager).keys()  # no "_orig_mod." in any name


def test_compiled_bf16_autocast_is_as_close_to_fp32_as_eager_bf16():
    tokens = ids(seq=64)

    def run(compiled: bool, autocast: bool):
        model = adapted_llama(0.0, "full", compiled=compiled)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return loss_and_grads(model, tokens)

    reference_loss, reference = run(False, False)
    errors = {}
    for compiled in (False, True):
        loss, grads = run(compiled, True)
        errors[compiled] = [float((grads[n] - reference[n]).norm() / reference[n].norm()) for n in reference]
        assert abs(float(loss - reference_loss)) < 2e-3
    assert max(errors[False]) < 2**-5  # bf16 matmuls: about 2% per gradient here
    for compiled_error, eager_error in zip(errors[True], errors[False], strict=True):
        assert compiled_error <= 1.1 * eager_error + 1e-4


def fixed_batches(steps: int, batch: int = 2, seq: int = 32):
    out = []
    for step in range(steps):
        tokens = ids(batch, seq, seed=100 + step)
        out.append({"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens.clone()})
    return out


def fit_adapters(model_dir, tmp_path, compiled: bool):
    torch.manual_seed(0)
    module = CausalLM(model=str(model_dir), dtype="fp32", lr=1e-3)
    trainer = L.Trainer(
        plugins=[NF4Precision(compute_dtype="fp32")],
        callbacks=[
            LoRA(
                r=8,
                alpha=16,
                dropout=0.0,
                gradient_checkpointing=True,
                compile_blocks=compiled,
                # dynamo's capture and AOT autograd without Inductor's C++ codegen (a minute of CPU): this test is
                # about the callback's wiring; Inductor's numbers are the tests above and below
                compile_kwargs={"backend": "aot_eager"},
            )
        ],
        strategy=PagedOptimizerStrategy("adamw_32bit"),
        max_steps=3,
        limit_val_batches=1,
        val_check_interval=3,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    batches = fixed_batches(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    assert not [w for w in caught if "broke the compiled graphs" in str(w.message)]
    return module, lora_state_dict(module.model)


def test_lora_callback_compiles_the_blocks_and_trains_like_eager(tiny_llama_dir, tmp_path):
    module, adapters = fit_adapters(tiny_llama_dir, tmp_path / "compiled", compiled=True)
    eager, eager_adapters = fit_adapters(tiny_llama_dir, tmp_path / "eager", compiled=False)
    assert all(is_compiled(layer) for layer in module.model.model.layers)
    assert adapters.keys() == eager_adapters.keys() and len(adapters) == 28
    for name, value in adapters.items():
        # fp32 throughout; Adam turns the ~1e-6 round-off of near-zero gradients into ~1e-5 moves of a few weights
        torch.testing.assert_close(value, eager_adapters[name], rtol=0, atol=1e-4, msg=name)
    assert any(float(v.abs().max()) > 1e-3 for k, v in adapters.items() if k.endswith("lora_B")), "nothing trained"
    assert [step for step, _ in module.val_history] == [0, 3]  # sanity check and the validation after step 3
    assert [v for _, v in module.val_history] == pytest.approx([v for _, v in eager.val_history], rel=1e-5)


def test_packed_rows_go_through_compiled_blocks_as_in_eager():
    """Packed batches (positions restarting, no attention mask): each block gets the block-diagonal mask as input."""
    eager = adapted_llama(0.0, "full", compiled=False, layers=1)
    compiled = adapted_llama(0.0, "full", compiled=False, layers=1)
    assert compile_blocks(compiled, backend="aot_eager") == 1  # graph capture as Inductor sees it, no codegen
    tokens = ids()
    positions = torch.cat([torch.arange(12), torch.arange(20)]).expand(2, -1)
    results = []
    for model in (eager, compiled):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, position_ids=positions, labels=tokens, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) == 14
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert graph_break_report() is None


def test_a_graph_break_in_a_block_is_reported_in_one_line():
    model = adapted_llama(0.0, "full", compiled=True)
    assert graph_break_report() is None

    class Counter:  # a hook that changes an outer object inside the checkpointed block: a graph break
        calls = 0

        def __call__(self, *args) -> None:
            self.calls += 1

    counter = Counter()
    model.model.layers[0].mlp.register_forward_pre_hook(counter)
    loss_and_grads(model, ids())
    report = graph_break_report()
    assert report is not None and "\n" not in report and counter.calls
    assert graph_break_report(graph_break_counts()) is None  # nothing new since then
    assert report.startswith("torch.compile broke the compiled graphs") and "TORCH_LOGS=graph_breaks" in report


def test_lora_callback_warns_once_after_the_first_step_when_the_graphs_broke():
    callback = LoRA(compile_blocks=True)
    module = torch.nn.Linear(64, 64)
    counters["graph_break"]["a break before this fit"] += 1  # not this run's: never reported
    callback.on_train_start(None, module)
    counters["graph_break"]["Dynamo does not know how to trace the builtin `time.sleep`"] += 3
    with pytest.warns(UserWarning, match=r"^LoRA\(compile_blocks=True\): torch.compile broke the compiled graphs 3 "):
        callback.on_train_batch_end(None, module, None, None, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_train_batch_end(None, module, None, None, 1)  # once per fit
        LoRA().on_train_batch_end(None, module, None, None, 0)  # compile_blocks off: never


class _Strategy:
    def __init__(self, strategy):
        self.strategy = strategy


def test_compile_blocks_is_refused_under_fsdp_with_one_line():
    from lightning_qlora import QLoRAFSDP2Strategy, QLoRAFSDPStrategy

    for strategy in (QLoRAFSDPStrategy(), QLoRAFSDP2Strategy()):
        with pytest.raises(ValueError, match=r"^LoRA\(compile_blocks=True\) is not supported with QLoRAFSDP") as err:
            refuse_sharded_compile(_Strategy(strategy))
        assert "\n" not in str(err.value) and "paged_ddp" in str(err.value)
    refuse_sharded_compile(_Strategy(PagedOptimizerStrategy()))  # one device: allowed
