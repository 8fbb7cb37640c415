"""Preference objectives on sequence log-probabilities (pure torch): DPO, IPO and ORPO, as TRL computes them.

``logps`` are sums of token log-probabilities over a response, ``Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) -
log π_ref(y_l))`` with ``y_w`` chosen and ``y_l`` rejected, and ``|y|`` a response's token count:

* DPO (sigmoid, label smoothing ε, Mitchell's conservative DPO): ``ℓ = -(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)``.
* IPO (log-ratios averaged per token, TRL's ``ipo``): ``ℓ = (Δ_w/|y_w| - Δ_l/|y_l| - 1/(2β))²``.
* ORPO (no reference; ``p̄ = logps/|y|``): ``ℓ = NLL(y_w) - β·log σ(log(p̄_w/(1-p̄_w)) - log(p̄_l/(1-p̄_l)))`` in
  probabilities, i.e. ``log odds = p̄ - log(1 - exp p̄)`` in log space; ``NLL(y_w)`` is the token-mean over chosen
  response tokens.

Rewards (logged, detached): ``β·(log π - log π_ref)`` for DPO and IPO, ``β·p̄`` for ORPO (TRL's definitions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PreferenceMethod = Literal["dpo", "ipo", "orpo"]
METHODS: tuple[str, ...] = ("dpo", "ipo", "orpo")

_LOG_HALF = -math.log(2.0)


@dataclass
class PreferenceOutput:
    """A batch's preference loss and the rewards it was built from."""

    loss: torch.Tensor
    """Scalar loss, the mean over pairs (ORPO: plus the chosen responses' NLL)."""
    chosen_rewards: torch.Tensor
    """``(B,)`` detached rewards of the chosen responses."""
    rejected_rewards: torch.Tensor
    """``(B,)`` detached rewards of the rejected responses."""

    def metrics(self) -> dict[str, torch.Tensor]:
        """Batch means: ``chosen``, ``rejected``, ``margins`` and ``accuracies`` (share with chosen > rejected)."""
        margins = self.chosen_rewards - self.rejected_rewards
        return {
            "chosen": self.chosen_rewards.mean(),
            "rejected": self.rejected_rewards.mean(),
            "margins": margins.mean(),
            "accuracies": (margins > 0).float().mean(),
        }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO loss ``-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)``.

    Args:
        chosen_logps: policy log-probabilities of the chosen responses ``(B,)``.
        rejected_logps: policy log-probabilities of the rejected responses ``(B,)``.
        ref_chosen_logps: reference log-probabilities of the chosen responses ``(B,)``.
        ref_rejected_logps: reference log-probabilities of the rejected responses ``(B,)``.
        beta: ``β``, the inverse temperature (strength of the KL anchor to the reference).
        label_smoothing: ``ε``, the assumed share of flipped labels (0: plain DPO).

    Returns:
        ``(B,)`` losses.
    """
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(beta * delta)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * delta)
    return loss


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Per-pair IPO loss ``(Δ_w/|y_w| - Δ_l/|y_l| - 1/(2β))²`` on per-token averages of the log-ratios.

    Args:
        chosen_logps: policy log-probabilities of the chosen responses ``(B,)``.
        rejected_logps: policy log-probabilities of the rejected responses ``(B,)``.
        ref_chosen_logps: reference log-probabilities of the chosen responses ``(B,)``.
        ref_rejected_logps: reference log-probabilities of the rejected responses ``(B,)``.
        chosen_tokens: response token counts ``(B,)`` (clamped to at least 1).
        rejected_tokens: response token counts ``(B,)``.
        beta: ``β`` (the paper's ``τ``): the target margin is ``1/(2β)``.

    Returns:
        ``(B,)`` losses.
    """
    chosen = (chosen_logps - ref_chosen_logps) / chosen_tokens.clamp(min=1)
    rejected = (rejected_logps - ref_rejected_logps) / rejected_tokens.clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (Mächler, 2012)."""
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """Per-pair ``log σ(log odds(p̄_w) - log odds(p̄_l))``, with ``log odds(p̄) = p̄ - log(1 - exp p̄)``.

    Args:
        chosen_mean_logps: per-token average log-probabilities of the chosen responses ``(B,)``.
        rejected_mean_logps: the same for the rejected responses ``(B,)``.

    Returns:
        ``(B,)`` log-sigmoids of the log odds ratio (the ORPO term is ``-β`` times their mean).
    """
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return F.logsigmoid(log_odds)


def preference_loss(
    method: PreferenceMethod,
    logps: torch.Tensor,
    tokens: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """The batch loss and rewards of ``method`` from the log-probabilities of ``[chosen..., rejected...]``.

    Args:
        method: ``dpo``, ``ipo`` or ``orpo``.
        logps: ``(2B,)`` response log-probability sums, the ``B`` chosen responses first.
        tokens: ``(2B,)`` response token counts, in the same order.
        ref_logps: ``(2B,)`` the reference model's sums (needed by ``dpo`` and ``ipo``, unused by ``orpo``).
        beta: ``β`` of the method.
        label_smoothing: ``ε`` of DPO.

    Returns:
        The :class:`PreferenceOutput`.

    Raises:
        ValueError: for an unknown method, an odd number of rows, or a missing reference.
    """
    if method not in METHODS:
        raise ValueError(f"unknown preference method {method!r}; use one of {', '.join(METHODS)}")
    if logps.dim() != 1 or logps.numel() % 2:
        raise ValueError(f"logps must be 1-D [chosen..., rejected...] with an even length, got {tuple(logps.shape)}")
    chosen, rejected = logps.float().chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    if method == "orpo":
        chosen_mean = chosen / chosen_tokens.clamp(min=1)
        rejected_mean = rejected / rejected_tokens.clamp(min=1)
        nll = -chosen.sum() / chosen_tokens.sum().clamp(min=1)
        loss = nll - beta * orpo_log_odds_ratio(chosen_mean, rejected_mean).mean()
        return PreferenceOutput(loss, beta * chosen_mean.detach(), beta * rejected_mean.detach())
    if ref_logps is None:
        raise ValueError(f"method {method!r} needs the reference log-probabilities (ref_logps)")
    ref_chosen, ref_rejected = ref_logps.float().chunk(2)
    if method == "dpo":
        losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    else:
        losses = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, beta)
    return PreferenceOutput(
        losses.mean(), beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    )


__all__ = [
    "METHODS",
    "PreferenceMethod",
    "PreferenceOutput",
    "dpo_loss",
    "ipo_loss",
    "log1mexp",
    "orpo_log_odds_ratio",
    "preference_loss",
]
