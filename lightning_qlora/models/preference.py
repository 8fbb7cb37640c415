"""``PreferenceLM``: DPO, IPO and ORPO on one (4-bit) model, whose reference is the same model with adapters off.

Each step scores the ``B`` chosen and ``B`` rejected sequences of a batch (``2B`` rows, from
:class:`~lightning_qlora.data.preference.PreferenceDataModule`) in one forward. DPO and IPO first run that forward
under ``torch.no_grad()`` with every LoRA update switched off (:func:`~lightning_qlora.lora.layer.adapters_disabled`):
the frozen base is the reference model, so no second copy is loaded, and its activations are freed before the
policy's forward starts. The reference is recomputed every step rather than cached per row: one no-grad forward
(about a third of a training step), nothing to precompute before training, and nothing stale across resumes or
data-parallel ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_qlora.lora.layer import adapters_disabled, is_lora_parameter
from lightning_qlora.models.causal_lm import CausalLM
from lightning_qlora.models.losses import IGNORE_INDEX, at_least_fp32, chunked_loss_unsupported, last_hidden_state
from lightning_qlora.models.preference_losses import METHODS, PreferenceMethod, PreferenceOutput, preference_loss
from lightning_qlora.models.sequence_logps import sequence_logps

__all__ = ["PreferenceLM", "model_sequence_logps"]

_VAL_KEYS = ("loss", "chosen", "rejected", "margins", "accuracies")


def model_sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of a causal LM's log-probabilities of the labelled tokens, and their counts.

    With ``chunk_size`` and a model :func:`~lightning_qlora.models.losses.chunked_loss_unsupported` accepts, the head
    runs over the labelled tokens in chunks (:func:`~lightning_qlora.models.sequence_logps.sequence_logps`);
    otherwise the model's own logits (post-processing such as soft-capping included) are used whole.

    Args:
        model: a transformers ``*ForCausalLM`` model.
        input_ids: ``(N, T)`` token ids.
        labels: ``(N, T)`` labels, ``-100`` where nothing is scored; shifted inside.
        attention_mask: ``(N, T)`` padding mask.
        chunk_size: tokens per chunk, or ``None`` for the model's own logits.

    Returns:
        ``(logps, tokens)``, each ``(N,)``.
    """
    if chunk_size is not None and chunked_loss_unsupported(model) is None:
        outputs = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        head = model.get_output_embeddings()
        return sequence_logps(last_hidden_state(outputs), head.weight, labels, chunk_size, bias=head.bias)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logits = at_least_fp32(logits)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2) - torch.logsumexp(logits, dim=-1)
    return (picked * mask).sum(dim=1), mask.sum(dim=1)


class PreferenceLM(CausalLM):
    """Preference tuning of a causal LM: DPO, IPO or ORPO, the reference being the base with adapters disabled.

    Train it with :class:`~lightning_qlora.LoRA` (the adapters are what moves; without LoRA layers the "reference"
    would be the trained model itself, so DPO and IPO refuse to start) and a
    :class:`~lightning_qlora.data.preference.PreferenceDataModule`. Logged: ``train_loss``/``val_loss`` (the
    preference loss; ``val_loss`` is what checkpoints and early stopping monitor), and per split
    ``{split}_rewards/chosen``, ``/rejected``, ``/margins``, ``/accuracies`` (TRL's names), plus ``train_tokens``.

    Args:
        model: model source (see :class:`~lightning_qlora.CausalLM`).
        method: ``dpo`` (sigmoid), ``ipo`` or ``orpo`` (no reference pass).
        beta: ``β``: DPO's inverse temperature, IPO's ``τ`` (target margin ``1/(2β)``), ORPO's ``λ`` on the odds
            ratio term.
        label_smoothing: DPO's ``ε``, the assumed share of flipped preference labels, in ``[0, 0.5)``.
        **kwargs: every other :class:`~lightning_qlora.CausalLM` argument (``lr``, ``dtype``, ``loss_chunk_size``
            for the chunked log-probabilities, ...).

    Raises:
        ValueError: for an unknown method, ``beta <= 0``, or a label smoothing outside ``[0, 0.5)`` or used with
            a method other than DPO.
    """

    def __init__(
        self,
        model: str,
        method: PreferenceMethod = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"PreferenceLM got method={method!r}; use one of {', '.join(METHODS)}")
        if not beta > 0:
            raise ValueError(f"PreferenceLM got beta={beta!r}; pass a positive number (0.1 is common)")
        if not 0.0 <= label_smoothing < 0.5 or (label_smoothing and method != "dpo"):
            raise ValueError(
                f"PreferenceLM got label_smoothing={label_smoothing!r} with method={method!r}; it is DPO's flip "
                "rate, in [0, 0.5)"
            )
        super().__init__(model, **kwargs)
        self.method = method
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.val_metrics = nn.ModuleDict({key: MeanMetric() for key in _VAL_KEYS})
        self.preference_history: list[tuple[int, dict[str, float]]] = []
        """``(global_step, {loss, chosen, rejected, margins, accuracies})`` after every validation pass."""

    @property
    def needs_reference(self) -> bool:
        """Whether each step runs the reference forward (DPO and IPO; ORPO has no reference)."""
        return self.method != "orpo"

    @override
    def on_fit_start(self) -> None:
        """Refuse a reference that would not be the pretrained model (LoftQ-initialised adapters, trained modules).

        Raises:
            ValueError: for DPO or IPO with ``LoRA(init="loftq")``, or with parameters trained outside the adapters
                (``LoRA(trainable_modules=...)``: switching the adapters off would leave them trained in the reference).
        """
        if self.needs_reference:
            trained = next(
                (n for n, p in self.model.named_parameters() if p.requires_grad and not is_lora_parameter(n)), None
            )
            if trained is not None:
                raise ValueError(
                    f"PreferenceLM(method={self.method!r}) trains {trained} outside the adapters, which would stay "
                    "trained in the reference (adapters off); drop LoRA(trainable_modules=...) or use method='orpo'"
                )
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if self.needs_reference and getattr(getattr(callback, "config", None), "init", None) == "loftq":
                raise ValueError(
                    f"PreferenceLM(method={self.method!r}) with LoRA(init='loftq'): with adapters off the base is not "
                    "the pretrained model (LoftQ moves its rounding error into the adapters); use init='zeros' or "
                    "method='orpo'"
                )

    # ------------------------------------------------------------------ steps
    def _sequence_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.hparams.get("loss_chunk_size")
        if chunk is not None and not getattr(self, "_fallback_warned", False):
            reason = chunked_loss_unsupported(self.model)
            if reason is not None:
                self._fallback_warned = True
                rank_zero_warn(f"PreferenceLM: loss_chunk_size={chunk} ignored, using the model's logits: {reason}")
        return model_sequence_logps(self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), chunk)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's response log-probabilities: this model, adapters off, no gradients.

        Raises:
            ValueError: if the model has no LoRA layer (the reference would be the policy itself).
        """
        if not getattr(self, "_adapters_checked", False):
            if not any(hasattr(m, "lora_A") and hasattr(m, "disabled") for m in self.model.modules()):
                raise ValueError(
                    f"PreferenceLM(method={self.method!r}) needs LoRA adapters: the reference model is the base with "
                    "adapters disabled; add the LoRA callback to the Trainer, or use method='orpo'"
                )
            self._adapters_checked = True
        with torch.no_grad(), adapters_disabled(self.model):
            return self._sequence_logps(batch)[0]

    def preference_step(self, batch: dict[str, torch.Tensor]) -> tuple[PreferenceOutput, torch.Tensor]:
        """The batch's loss and rewards, and its scored (response) token count.

        The reference pass (DPO, IPO) runs first, so its activations are gone before the policy's forward.
        """
        reference = self.reference_logps(batch) if self.needs_reference else None
        logps, tokens = self._sequence_logps(batch)
        out = preference_loss(self.method, logps, tokens, reference, self.beta, self.label_smoothing)
        return out, tokens.sum()

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The preference loss; rewards, margins and accuracy logged per step."""
        out, tokens = self.preference_step(batch)
        pairs = batch["input_ids"].size(0) // 2
        self.log("train_loss", out.loss, prog_bar=True, batch_size=pairs)
        self.log_dict({f"train_rewards/{k}": v for k, v in out.metrics().items()}, batch_size=pairs)
        self.log("train_tokens", tokens.float(), reduce_fx="sum", batch_size=1)
        return out.loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate the held-out loss, rewards, margins and accuracy, weighted by pairs."""
        out, _ = self.preference_step(batch)
        pairs = float(batch["input_ids"].size(0) // 2)
        values = {"loss": out.loss.detach(), **out.metrics()}
        for key in _VAL_KEYS:
            self.val_metrics[key].update(values[key].float(), weight=pairs)

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss`` and ``val_rewards/*`` over the whole held-out set and remember them."""
        values = {}
        for key in _VAL_KEYS:
            values[key] = self.val_metrics[key].compute()
            self.val_metrics[key].reset()
        self.log("val_loss", values["loss"], prog_bar=True, sync_dist=True)
        self.log_dict({f"val_rewards/{k}": values[k] for k in _VAL_KEYS[1:]}, sync_dist=True)
        numbers = {k: float(v) for k, v in values.items()}
        if not math.isnan(numbers["loss"]):
            self.val_history.append((self.global_step, numbers["loss"]))
            self.preference_history.append((self.global_step, numbers))

    @override
    def on_fit_end(self) -> None:
        """Print the held-out preference accuracy and margin before and after training."""
        if len(self.preference_history) >= 2:
            (s0, first), (s1, last) = self.preference_history[0], self.preference_history[-1]
            rank_zero_info(
                f"PreferenceLM ({self.method}) held-out: accuracy {first['accuracies']:.3f} -> "
                f"{last['accuracies']:.3f}, margin {first['margins']:.4f} -> {last['margins']:.4f}, loss "
                f"{first['loss']:.4f} -> {last['loss']:.4f} (steps {s0} -> {s1})"
            )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the held-out histories, so a resumed run still reports the numbers before training."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["preference_history"] = [[step, dict(values)] for step, values in self.preference_history]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the held-out histories of the run that wrote ``checkpoint``."""
        super().on_load_checkpoint(checkpoint)
        self.preference_history = [(int(s), dict(v)) for s, v in checkpoint.get("preference_history", [])]
