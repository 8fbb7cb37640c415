"""``CausalLM``: a LightningModule around a transformers causal LM, loaded through the 4-bit quantize-on-load path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from lightning_qlora.models.generation import GenerationOptions, generate
from lightning_qlora.models.sources import ModelSourceError, load_causal_lm, resolve_model_dir, safetensors_files
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.utils.dtypes import to_dtype
from lightning_qlora.utils.errors import first_line


def check_vocabulary(model: nn.Module, tokenizer: Any) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings (another model's tokenizer), in one line.

    Raises:
        ValueError: naming both sizes.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model has embeddings for {rows}: it is another model's "
            "tokenizer; use the model's own (leave tokenizer= unset), or resize the model's embeddings first"
        )


class CausalLM(pl.LightningModule):
    """Fine-tune a causal LM; with :class:`~lightning_qlora.NF4Precision` its linear layers load straight into 4 bits.

    The model is built in ``configure_model`` (so no full-precision copy of the quantized layers ever reaches the
    device) from a local directory, a ``.gguf`` file, a ``pkg://`` path or a hub id. Defaults follow the QLoRA
    paper: AdamW at lr 2e-4, constant schedule (optional linear warmup); clip gradients at 0.3 with the Trainer's
    ``gradient_clip_val``.

    Args:
        model: model source (see :func:`lightning_qlora.models.sources.resolve_model_dir`).
        tokenizer: tokenizer source (default: the model's own).
        dtype: dtype of the unquantized parameters (embeddings, norms, head): ``auto`` (default: bf16 where the
            device computes it natively, else fp16 on GPUs and fp32 on CPUs), ``bf16``, ``fp16`` or ``fp32``.
        lr: learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warmup steps before the constant learning rate.
        trust_remote_code: allow model code from the checkpoint (off unless you turn it on).
        attn_implementation: transformers attention backend (default: transformers' own choice, SDPA where the
            model supports it, else eager).
        cache_dir: where GGUF conversions are cached.
        loss_chunk_size: compute the loss with :func:`~lightning_qlora.models.losses.chunked_cross_entropy` over
            this many tokens at a time (no fp32 logits for the whole batch, ignored tokens skipped); ``None``: the
            model's own loss. Models that rescale or cap their logits fall back to their own loss with a warning.
        init: ``"checkpoint"`` loads the weights; ``"random"`` needs only ``config.json`` (``model`` may be the
            ``.json`` itself) and draws every linear from ``N(0, init_std²)`` layer by layer, straight into 4 bits
            (a 70B architecture never exists in bf16; peak ≈ the 4-bit model plus one layer); give ``tokenizer``
            when a data module needs one.
        init_std: standard deviation of the random linears (default the config's ``initializer_range``).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str = "auto",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        cache_dir: str | None = None,
        loss_chunk_size: int | None = 4096,
        init: str = "checkpoint",
        init_std: float | None = None,
    ) -> None:
        if loss_chunk_size is not None and (type(loss_chunk_size) is not int or loss_chunk_size <= 0):
            raise ValueError(f"CausalLM got loss_chunk_size={loss_chunk_size!r}; pass a positive int (4096) or None")
        if init not in ("checkpoint", "random"):
            raise ValueError(f"CausalLM got init={init!r}; use 'checkpoint' (load the weights) or 'random'")
        super().__init__()
        self.save_hyperparameters()
        self.source = model
        self.tokenizer_source = tokenizer
        self.dtype_ = to_dtype(dtype)
        self.model: nn.Module | None = None
        self._tokenizer: Any = None
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_history: list[tuple[int, float]] = []
        """``(global_step, held-out loss)`` after every validation pass, sanity check included."""
        self.generation = GenerationOptions()
        """Decoding options of :meth:`predict_step` (greedy by default; ``lightning-qlora generate`` sets them)."""

    # ------------------------------------------------------------------ building
    @property
    def model_dir(self) -> Any:
        """The local transformers directory the model and tokenizer load from (converted/downloaded on first use)."""
        return resolve_model_dir(self.source, self.hparams.cache_dir)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded lazily; a pad token is set to eos when the tokenizer has none)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source: Any = self.tokenizer_source or self.model_dir
            if self.tokenizer_source is None and self.hparams.get("init", "checkpoint") == "checkpoint":
                if Path(source).is_dir():
                    safetensors_files(Path(source))  # config.json alone: blame the weights, not the tokenizer
            if str(source).endswith(".gguf") or str(source).startswith("pkg://"):
                source = resolve_model_dir(source, self.hparams.cache_dir)  # GGUF conversions carry the tokenizer
            try:
                tok = AutoTokenizer.from_pretrained(source, trust_remote_code=self.hparams.trust_remote_code)
            except (OSError, ValueError) as err:
                raise ModelSourceError(
                    f"tokenizer {source}: cannot load ({first_line(err)}); pass a model folder with a valid "
                    "config.json and tokenizer files, or set tokenizer="
                ) from None
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def configure_model(self) -> None:
        """Build the transformers model, quantizing on load when the Trainer uses :class:`NF4Precision`."""
        if self.model is not None:
            return
        quantization = None
        device: Any = "cpu"
        if self._trainer is not None:
            config = getattr(self.trainer.precision_plugin, "config", None)  # NF4Precision's settings
            quantization = config if isinstance(config, QuantizationConfig) else None
            device = self.trainer.strategy.root_device
        self.model = load_causal_lm(
            self.model_dir,
            quantization=quantization,
            device=device,
            dtype=self.dtype_,
            trust_remote_code=self.hparams.trust_remote_code,
            attn_implementation=self.hparams.attn_implementation,
            init=self.hparams.get("init", "checkpoint"),
            init_std=self.hparams.get("init_std"),
        )
        if self._tokenizer is not None:  # loaded already (the data module's): ids it gives must have embeddings
            check_vocabulary(self.model, self._tokenizer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Run the wrapped model (returns its output object with ``.logits``)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------ steps
    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The model's inputs: ``input_ids``, ``labels`` and ``attention_mask`` or, packed, ``position_ids``."""
        inputs = {key: batch[key] for key in ("input_ids", "labels", "attention_mask", "position_ids") if key in batch}
        config = getattr(self.model, "config", None)
        if "position_ids" in inputs and "flash" in str(getattr(config, "_attn_implementation", "")):
            # flash-attention finds packed rows from position_ids in one flat row only (transformers'
            # _is_packed_sequence): lay the batch's packs end to end; the loss is per token, so it is unchanged
            inputs.update({k: inputs[k].reshape(1, -1) for k in ("input_ids", "labels", "position_ids")})
        return inputs

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = (batch["labels"][:, 1:] != -100).sum()
        inputs = self._inputs(batch)
        if "position_ids" in inputs and not getattr(self, "_packing_checked", False):
            from lightning_qlora.models.packed import check_packed_rows_stay_apart

            check_packed_rows_stay_apart(self.model, inputs["input_ids"])
            self._packing_checked = True
        chunk = self.hparams.get("loss_chunk_size")
        if chunk is not None:
            from lightning_qlora.models.losses import causal_lm_loss, chunked_loss_unsupported

            reason = chunked_loss_unsupported(self.model)
            if reason is None:
                ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
                return causal_lm_loss(self.model, ids, labels, mask, chunk, inputs.get("position_ids")), tokens
            if not getattr(self, "_chunked_loss_warned", False):
                self._chunked_loss_warned = True
                rank_zero_warn(f"CausalLM: loss_chunk_size={chunk} ignored, using the model's own loss: {reason}")
        return self.model(**inputs, use_cache=False).loss, tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Next-token cross-entropy on the trained (response) tokens."""
        loss, tokens = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log("train_tokens", tokens.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Token-weighted held-out loss; perplexity is ``exp`` of its epoch mean."""
        loss, tokens = self._loss(batch)
        self.val_loss.update(loss.detach().float(), weight=tokens.float())

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss``/``val_ppl`` over the whole held-out set and remember them."""
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val_loss", value, prog_bar=True, sync_dist=True)
        self.log("val_ppl", torch.exp(value), sync_dist=True)
        if not math.isnan(float(value)):
            self.val_history.append((self.global_step, float(value)))

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Complete each prompt of a left-padded batch with transformers' ``generate`` (KV cache, :attr:`generation`).

        Args:
            batch: ``input_ids`` and ``attention_mask`` padded on the left and, optionally, ``rows`` (one dict per
                prompt, copied into its prediction); :class:`~lightning_qlora.models.generation.PromptCollator`
                builds it.
            batch_idx: index of the batch (a sampling ``seed`` becomes ``seed + batch_idx``).
            dataloader_idx: unused.

        Returns:
            One dict per prompt: its row's fields plus ``completion``, ``finish_reason`` (``stop``/``length``),
            ``prompt_tokens`` and ``completion_tokens``.
        """
        options = self.generation
        seed = None if options.seed is None else options.seed + batch_idx
        completions = generate(self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"], options, seed)
        rows = batch.get("rows") or [{} for _ in completions]
        return [
            {
                **row,
                "completion": c.text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
            }
            for row, c in zip(rows, completions)
        ]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the held-out loss history, so a resumed run still reports the loss before training."""
        checkpoint["val_history"] = [list(item) for item in self.val_history]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the held-out loss history of the run that wrote ``checkpoint``."""
        self.val_history = [(int(step), float(loss)) for step, loss in checkpoint.get("val_history", [])]

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        """AdamW over trainable parameters; constant lr after ``warmup_steps`` of linear warmup."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("CausalLM has no trainable parameters; add the LoRA callback to the Trainer")
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay
        )
        warmup = max(0, int(self.hparams.warmup_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
