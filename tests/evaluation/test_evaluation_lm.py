"""LightningLM vs lm-eval's own HFLM on the same tiny Llama weights (fp32): numbers, strings, accuracies."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_llama
from lm_eval.api.instance import Instance

from lightning_qlora.evaluation import EvaluationError, LightningLM, evaluate

CONTEXTS = [
    "The quick brown",
    "",
    "Question: What is the capital of France? Answer: ",
    "the cat sat on the mat; the dog",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z " * 3,  # > max_length=48: left truncation
]
CONTINUATIONS = [" fox", "the cat", "Paris", " sat on the log", " 0 1 2", "."]


class Wrapper(torch.nn.Module):
    """Stand-in for lightning_qlora.models.causal_lm.CausalLM: `.model` + `.tokenizer` only."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer


class NoGenerate(torch.nn.Module):
    """A black-box causal LM without `.generate` or `.config`."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids=None, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def _hflm(model, tokenizer, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, **kw)


def _ll_requests(n_contexts=None):
    pairs = [(c, x) for c in CONTEXTS[:n_contexts] for x in CONTINUATIONS]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _gen_requests():
    prompts = ["The quick", "A B C", "Question: What is the capital", "the", "Low-rank adapters"]
    reqs = [(p, {"until": ["."], "max_gen_toks": 10}) for p in prompts]
    reqs += [(p, {"until": ["\n", "Z"], "max_gen_toks": 6, "do_sample": False}) for p in prompts[:3]]
    return [Instance("generate_until", {}, r, i) for i, r in enumerate(reqs)]


def _assert_ll_close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for (la, ga), (lb, gb) in zip(a, b):
        assert math.isclose(la, lb, abs_tol=tol), (la, lb)
        assert ga == gb


@pytest.mark.parametrize("max_length", [None, 48])
def test_loglikelihood_matches_hflm(tiny_tokenizer, max_length):
    model = build_tiny_llama()
    model.train()
    ours = LightningLM(Wrapper(model, tiny_tokenizer), batch_size=3, max_length=max_length)
    got = ours.loglikelihood(_ll_requests(), disable_tqdm=True)
    assert model.training, "train mode must be restored"
    want = _hflm(model, tiny_tokenizer, batch_size=3, max_length=max_length).loglikelihood(
        _ll_requests(), disable_tqdm=True
    )
    _assert_ll_close(got, want)


def test_rolling_and_generation_match_hflm(tiny_tokenizer):
    model = build_tiny_llama()
    docs = ["the cat sat on the mat", " ".join(["Low-rank adapters train a few parameters."] * 8), "A"]
    rolling = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    ours = LightningLM(model, tokenizer=tiny_tokenizer, batch_size=2, max_length=64)
    got_roll = ours.loglikelihood_rolling(rolling, disable_tqdm=True)
    got_gen = ours.generate_until(_gen_requests(), disable_tqdm=True)
    hf = _hflm(model, tiny_tokenizer, batch_size=2, max_length=64)
    want_roll = hf.loglikelihood_rolling(rolling, disable_tqdm=True)
    want_gen = hf.generate_until(_gen_requests(), disable_tqdm=True)
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(got_roll, want_roll)), (got_roll, want_roll)
    assert len(ours.tok_encode(docs[1])) > 64  # several rolling windows
    assert got_gen == want_gen
    assert all(isinstance(s, str) for s in got_gen) and any(got_gen)


def test_bos_handling_matches_hflm(tiny_tokenizer_dir):
    """A tokenizer that adds BOS itself: HFLM keeps it, `add_bos_token=False` removes it; we must do the same."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)]
    )
    assert tok.encode("the cat")[0] == tok.bos_token_id
    model = build_tiny_llama()
    for flag in (None, False):
        ours = LightningLM(model, tokenizer=tok, batch_size=4, add_bos_token=flag)
        hf = _hflm(model, tok, batch_size=4, add_bos_token=flag)
        assert ours.tok_encode("the cat") == hf.tok_encode("the cat")
        _assert_ll_close(
            ours.loglikelihood(_ll_requests(3), disable_tqdm=True), hf.loglikelihood(_ll_requests(3), disable_tqdm=True)
        )
        assert ours.generate_until(_gen_requests()[:3], disable_tqdm=True) == hf.generate_until(
            _gen_requests()[:3], disable_tqdm=True
        )


def test_black_box_model_without_generate(tiny_tokenizer):
    model = build_tiny_llama()
    ours = LightningLM(NoGenerate(model), tokenizer=tiny_tokenizer, batch_size=4, max_length=256)
    hf = _hflm(model, tiny_tokenizer, batch_size=1)
    requests = _gen_requests()[:2] + _gen_requests()[-2:]
    assert ours.generate_until(requests, disable_tqdm=True) == hf.generate_until(requests, disable_tqdm=True)
    _assert_ll_close(
        ours.loglikelihood(_ll_requests(3), disable_tqdm=True), hf.loglikelihood(_ll_requests(3), disable_tqdm=True)
    )


def test_modes_restored_no_copies_no_moves(tiny_tokenizer, monkeypatch):
    model = build_tiny_llama()
    module = Wrapper(model, tiny_tokenizer)
    module.train()
    model.model.layers[0].eval()  # a deliberately frozen-in-eval submodule must stay in eval
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    for name in ("to", "half", "float", "bfloat16", "cpu", "cuda", "type"):
        monkeypatch.setattr(model, name, lambda *a, **k: pytest.fail("the bridge must not move/cast the model"))
    lm = LightningLM(module, batch_size=2)
    assert lm.device == torch.device("cpu") and lm.model is model and lm.tokenizer is tiny_tokenizer
    lm.loglikelihood(_ll_requests()[:6], disable_tqdm=True)
    lm.generate_until(_gen_requests()[:2], disable_tqdm=True)
    assert module.training and model.training and not model.model.layers[0].training
    assert model.model.layers[1].training
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}

    def boom(*args, **kwargs):
        assert not model.training and not torch.is_grad_enabled()
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        lm.loglikelihood(_ll_requests()[:2], disable_tqdm=True)
    assert module.training and model.training and not model.model.layers[0].training


def _state(module):
    """Device, dtype, storage and requires_grad of every parameter, buffer and 4-bit quantization constant."""
    from lightning_qlora.quantization.nf4 import is_4bit_linear

    out = {n: (t.device, t.dtype, t.data_ptr(), t.requires_grad) for n, t in module.named_parameters()}
    out.update({f"buffer:{n}": (t.device, t.dtype, t.data_ptr()) for n, t in module.named_buffers()})
    for name, m in module.named_modules():
        if is_4bit_linear(m):
            absmax = m.weight.quant_state.absmax
            out[f"absmax:{name}"] = (absmax.device, absmax.dtype, absmax.data_ptr())
    return out


def test_4bit_lora_model_in_train_mode_is_untouched(tiny_tokenizer):
    """A 4-bit base with LoRA adapters, mid-fit (train mode, some submodules in eval): evaluating it changes no mode,
    moves/casts/copies no tensor, and scores exactly like HFLM on the same adapted weights."""
    from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_modules, mark_only_lora_trainable
    from lightning_qlora.quantization.nf4 import QuantizationConfig, is_4bit_linear
    from lightning_qlora.quantization.shells import quantize_model

    model = build_tiny_llama()
    quantize_model(model, QuantizationConfig(compute_dtype=torch.float32), device="cpu")
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.normal_(0, 0.05)
    module = Wrapper(model, tiny_tokenizer).train()
    model.model.layers[0].self_attn.eval()
    assert sum(is_4bit_linear(m) for m in model.modules()) >= 14 and len(list(lora_modules(model))) >= 14
    modes = {n: m.training for n, m in module.named_modules()}
    state = _state(module)

    lm = LightningLM(module, batch_size=3, max_length=48)
    got = lm.loglikelihood(_ll_requests(3), disable_tqdm=True)
    gen = lm.generate_until(_gen_requests()[:3], disable_tqdm=True)
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("the cat sat on the mat " * 6,), 0)], True)
    assert {n: m.training for n, m in module.named_modules()} == modes
    assert not model.model.layers[0].self_attn.training and model.model.layers[1].self_attn.training
    assert _state(module) == state

    hf = _hflm(model, tiny_tokenizer, batch_size=3, max_length=48)  # HFLM leaves the model in eval mode for good
    _assert_ll_close(got, hf.loglikelihood(_ll_requests(3), disable_tqdm=True))
    assert gen == hf.generate_until(_gen_requests()[:3], disable_tqdm=True)
    assert not model.training


def test_constructor_errors(tiny_tokenizer):
    model = build_tiny_llama()
    with pytest.raises(EvaluationError, match="tokenizer"):
        LightningLM(model)
    with pytest.raises(EvaluationError, match="batch_size"):
        LightningLM(model, tokenizer=tiny_tokenizer, batch_size=0)
    lm = LightningLM(model, tokenizer=tiny_tokenizer, max_length=8)
    with pytest.raises(EvaluationError, match="max_gen_toks"):
        lm.generate_until([Instance("generate_until", {}, ("hi", {"max_gen_toks": 8}), 0)], disable_tqdm=True)


def _write_mc_task(folder, n_test=12):
    """An MMLU-format local task (json data, absolute paths) in its own include folder."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["cat", "dog", "fox", "mat", "log", "Paris", "winter", "birds"]
    rows = []
    for i in range(n_test + 5):
        choices = [f"the {words[(i + k) % len(words)]}" for k in range(4)]
        rows.append(
            {"question": f"Question {i}: where did the {words[i % 8]} sit?", "choices": choices, "answer": i % 4}
        )
    for split, part in (("dev", rows[:5]), ("test", rows[5:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (folder / "local_mc.yaml").write_text(
        "task: local_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    dev: {folder / 'dev.jsonl'}\n    test: {folder / 'test.jsonl'}\n"
        "test_split: test\nfewshot_split: dev\nfewshot_config:\n  sampler: first_n\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}'
        '\\nD. {{choices[3]}}\\nAnswer:"\n'
        'doc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


def test_simple_evaluate_accuracy_matches_hflm(tiny_tokenizer, tmp_path):
    import lm_eval

    from lightning_qlora.evaluation.tasks import build_task_manager

    folder = _write_mc_task(tmp_path / "tasks")
    model = build_tiny_llama(seed=3)
    ours = evaluate(
        Wrapper(model, tiny_tokenizer), ["local_mc"], num_fewshot=2, include_path=folder, log_samples=True, batch_size=4
    )
    setup = build_task_manager(["local_mc"], include_path=folder)
    seeds = dict(random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    theirs = lm_eval.simple_evaluate(
        model=_hflm(model, tiny_tokenizer, batch_size=4),
        tasks=["local_mc"],
        num_fewshot=2,
        task_manager=setup.manager,
        log_samples=True,
        **seeds,
    )
    a, b = ours["results"]["local_mc"], theirs["results"]["local_mc"]
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    assert ours["n-shot"]["local_mc"] == 2
    sa, sb = ours["samples"]["local_mc"], theirs["samples"]["local_mc"]
    assert [s["doc_id"] for s in sa] == [s["doc_id"] for s in sb] and len(sa) == 12
    for x, y in zip(sa, sb):
        assert x["arguments"] == y["arguments"]
        for rx, ry in zip(x["resps"], y["resps"]):
            assert math.isclose(float(rx[0][0]), float(ry[0][0]), abs_tol=1e-5)


def test_nf4_bf16_loglikelihoods_match_hflm_within_bf16_tolerance(tiny_llama_dir, tiny_tokenizer):
    """The quantized path as trained: NF4 + DQ, bf16 compute. Over the same model object our numbers are HFLM's; over
    the same checkpoint loaded by transformers' own bitsandbytes path (conftest's anchor) they agree within bf16."""
    from conftest import load_with_hf_bitsandbytes

    from lightning_qlora.models.sources import load_causal_lm
    from lightning_qlora.quantization.nf4 import QuantizationConfig, guard_cpu_repack, is_4bit_linear

    ours_model = load_causal_lm(tiny_llama_dir, quantization=QuantizationConfig(), dtype=torch.bfloat16)
    assert sum(is_4bit_linear(m) for m in ours_model.modules()) == 14
    requests = _ll_requests(3)
    got = LightningLM(ours_model, tokenizer=tiny_tokenizer, batch_size=4).loglikelihood(requests, disable_tqdm=True)
    hf = _hflm(ours_model, tiny_tokenizer, batch_size=4, softmax_dtype=torch.float32)
    _assert_ll_close(got, hf.loglikelihood(_ll_requests(3), disable_tqdm=True))  # same object and batches: same numbers

    def close(a, b):  # bf16 has 8 significant bits: log-likelihood sums agree to about 2^-8 of their size
        return all(math.isclose(x, y, rel_tol=2**-7, abs_tol=0.05) for (x, _), (y, _) in zip(a, b)) and len(a) == len(b)

    plain_hf = _hflm(ours_model, tiny_tokenizer, batch_size=4).loglikelihood(_ll_requests(3), disable_tqdm=True)
    assert close(got, plain_hf), (got, plain_hf)  # HFLM's default log-softmax in bf16 (ours: fp32)
    anchor = load_with_hf_bitsandbytes(tiny_llama_dir)
    guard_cpu_repack(anchor)
    theirs = _hflm(anchor, tiny_tokenizer, batch_size=4).loglikelihood(_ll_requests(3), disable_tqdm=True)
    assert close(got, theirs), (got, theirs)
    assert sum(g == t for (_, g), (_, t) in zip(got, theirs)) >= len(got) - 1  # greedy flags (a near tie may flip)
