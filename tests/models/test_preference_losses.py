"""DPO, IPO and ORPO losses and their gradients against TRL's own code on the same log-probabilities (fp32, 1e-6).

TRL is a test client here: its trainers' loss code runs on bare objects (``object.__new__``) with only the attributes
that code reads, fed by a stand-in model that returns our tensors.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lightning_qlora.models.preference import model_sequence_logps
from lightning_qlora.models.preference_losses import log1mexp, preference_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")

B, T, V = 4, 12, 32
CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _batch(seed: int = 0):
    """Per-token log-probabilities of 2B sequences with ragged completions, plus a reference's sums."""
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 2, T + 1, (1,), generator=g))
        completion[row, start:end] = 1
    per_token = (-3 * torch.rand(2 * B, T - 1, generator=g)) * completion[:, 1:]
    ref = per_token.sum(1) + 0.5 * torch.randn(2 * B, generator=g)
    return per_token, completion, ref


def _trl_dpo(per_token, completion, ref, loss_type: str, beta: float):
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    vars(trainer).update(
        model=SimpleNamespace(training=True), accelerator=CPU, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": completion, "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}  # fmt: skip
    loss = trainer._compute_loss(lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize(("method", "trl_type", "beta"), [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 2.0),
                                                         ("ipo", "ipo", 0.1), ("ipo", "ipo", 0.5)])  # fmt: skip
def test_dpo_and_ipo_losses_and_gradients_equal_trls(method, trl_type, beta):
    per_token, completion, ref = _batch()
    theirs_in = per_token.clone().requires_grad_(True)
    theirs, metrics = _trl_dpo(theirs_in, completion, ref, trl_type, beta)
    theirs.backward()
    ours_in = per_token.clone().requires_grad_(True)
    out = preference_loss(method, ours_in.sum(1), completion[:, 1:].sum(1), ref, beta)
    out.loss.backward()
    torch.testing.assert_close(out.loss, theirs.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-6)
    assert ours_in.grad.abs().sum() > 0
    ours = {f"rewards/{k}": float(v) for k, v in out.metrics().items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[key] == pytest.approx(metrics[key][0], abs=1e-6), key


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_dpo_label_smoothing_equals_trls_conservative_sigmoid(label_smoothing):
    """TRL 1.16's DPOTrainer dropped ε from ``sigmoid``; its CPOTrainer keeps the same formula on log-ratios."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    per_token, completion, ref = _batch(seed=1)
    trainer = object.__new__(CPOTrainer)
    vars(trainer).update(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=label_smoothing, accelerator=CPU)
    theirs_in = per_token.clone().requires_grad_(True)
    ratios = theirs_in.sum(1) - ref
    losses, _, _ = trainer.cpo_loss(*ratios.chunk(2))
    losses.mean().backward()
    ours_in = per_token.clone().requires_grad_(True)
    out = preference_loss("dpo", ours_in.sum(1), completion[:, 1:].sum(1), ref, 0.2, label_smoothing)
    out.loss.backward()
    torch.testing.assert_close(out.loss, losses.mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-6)


def test_orpo_loss_and_gradients_equal_trls_from_the_same_logits():
    """ORPO end to end from logits: TRL's concatenated forward, NLL and odds ratio against ours.

    Each prompt is one token, so TRL's NLL (over prompt and response) and ours (over the response) score the same
    tokens; padding is masked in both.
    """
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (2 * B, T), generator=g)
    mask = torch.ones(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        mask[row, T - row % 4 :] = 0  # right padding of 0..3 tokens
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # the one-token prompt
    logits = 4 * torch.randn(2 * B, T, V, generator=g)

    trainer = object.__new__(ORPOTrainer)
    vars(trainer).update(is_encoder_decoder=False, padding_value=0, accelerator=CPU, aux_loss_enabled=False, beta=0.25)
    theirs_in = logits.clone().requires_grad_(True)
    batch = {}
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch.update(
            {f"{side}_input_ids": ids[rows], f"{side}_attention_mask": mask[rows], f"{side}_labels": labels[rows]}
        )
    theirs, metrics = trainer.get_batch_loss_metrics(
        lambda input_ids, **kwargs: SimpleNamespace(logits=theirs_in), batch
    )
    theirs.backward()

    ours_in = logits.clone().requires_grad_(True)
    model = lambda **kwargs: SimpleNamespace(logits=ours_in)  # noqa: E731  (no chunked path: the logits are given)
    logps, tokens = model_sequence_logps(model, ids, labels, mask, chunk_size=None)
    out = preference_loss("orpo", logps, tokens, beta=0.25)
    out.loss.backward()
    torch.testing.assert_close(out.loss, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(out.metrics()[key.split("/")[1]]) == pytest.approx(metrics[key], abs=1e-6), key


def test_log1mexp_is_stable_on_both_branches():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -5.0, -15.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x.float()).double(), torch.log(-torch.expm1(x)), rtol=1e-6, atol=0)


def test_bad_arguments_are_one_line_errors():
    logps, tokens = torch.zeros(4), torch.ones(4, dtype=torch.long)
    for kwargs, fragment in (
        ({"method": "kto"}, "unknown preference method"),
        ({"method": "dpo"}, "needs the reference"),
    ):
        with pytest.raises(ValueError, match=fragment) as err:
            preference_loss(kwargs["method"], logps, tokens)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="even length"):
        preference_loss("orpo", torch.zeros(3), torch.ones(3))
