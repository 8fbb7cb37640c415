"""`evaluate()`: run lm-eval tasks on a live module, plus result helpers (table, flat metrics, atomic JSON)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_qlora.evaluation.tasks import EvaluationError, build_task_manager, load_tasks
from lightning_qlora.utils.atomic import atomic_write_text
from lightning_qlora.utils.imports import lm_eval as optional_lm_eval

log = logging.getLogger(__name__)

RESULTS_FILENAME = "lm_eval_results.json"
_NON_METRIC_KEYS = {"alias", "name", "sample_len", "sample_count", "samples"}


def evaluate(
    module_or_model: Any,
    tasks: str | Sequence[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    mmlu_path: str | os.PathLike | None = None,
    tokenizer: Any = None,
    log_samples: bool = False,
    output_path: str | os.PathLike | None = None,
    seed: int = 1234,
    **simple_evaluate_kwargs: Any,
) -> dict:
    """Evaluate a causal LM (a module with `.model`/`.tokenizer`, or a model + `tokenizer`) with lm-eval.

    Args:
        module_or_model: e.g. a `lightning_qlora.CausalLM`, a transformers causal LM, or a `LightningLM`.
        tasks: lm-eval task/group names (list or comma-separated), glob patterns, or task YAML paths.
        num_fewshot: few-shot examples per prompt (None: each task's default; tasks pinned to 0 stay 0).
        limit: examples per task (int) or fraction (float < 1); for quick checks only.
        batch_size: requests per forward pass.
        include_path: folder(s) of extra task YAMLs.
        mmlu_path: local copy of `cais/mmlu` (see `docs/evaluation.md`); `mmlu*` tasks then read it offline.
        tokenizer: overrides the module's tokenizer.
        log_samples: keep per-sample records (`results["samples"]`, written next to the JSON as `*_samples.json`).
        output_path: write the results JSON atomically: a `.json` file path, or a folder (gets `lm_eval_results.json`).
        seed: python/numpy/torch/few-shot seeds for lm-eval; the caller's RNG states are restored afterwards.
        **simple_evaluate_kwargs: passed to `lm_eval.simple_evaluate` (e.g. `apply_chat_template`, `gen_kwargs`).

    Returns:
        lm-eval's results dict (`results`, `groups`, `configs`, `n-shot`, `versions`, ...).
    """
    lm_eval = optional_lm_eval()
    from lightning.pytorch.utilities.seed import isolate_rng

    from lightning_qlora.evaluation.lm import LightningLM

    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
        raise EvaluationError(f"limit={limit!r} must be a positive int (examples) or a float in (0, 1) (fraction)")
    setup = build_task_manager(tasks, include_path=include_path, mmlu_path=mmlu_path)
    if isinstance(module_or_model, LightningLM):
        lm = module_or_model
    else:
        lm = LightningLM(module_or_model, tokenizer=tokenizer, batch_size=batch_size)
    with isolate_rng():  # lm-eval reseeds the global RNGs; keep a training run's RNG stream untouched
        items = load_tasks(setup, num_fewshot=num_fewshot)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=items,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=lm.batch_size,
            log_samples=log_samples,
            task_manager=setup.manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            **simple_evaluate_kwargs,
        )
    if results is None:  # only happens on non-zero ranks of a distributed lm-eval run
        return {}
    results = dict(results)
    if output_path is not None:
        path = Path(output_path)
        if path.suffix != ".json":
            path = path / RESULTS_FILENAME
        write_results_json(results, path)
    return results


def format_results_table(results: dict) -> str:
    """lm-eval's markdown tables (tasks, then groups) for a results dict."""
    make_table = optional_lm_eval("utils").make_table

    if not results or not results.get("results"):
        return ""
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def flatten_metrics(results: dict, prefix: str = "lm_eval") -> dict[str, float]:
    """Numeric task and group metrics as `{prefix}/{task}/{metric}` (lm-eval's `,none` filter suffix dropped).

    Other filters are kept as a suffix (`exact_match,strict-match` -> `exact_match_strict-match`); non-numeric
    values (aliases, `"N/A"` stderrs) and NaN/inf are skipped.
    """
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in (metrics or {}).items():
                if key in _NON_METRIC_KEYS or isinstance(value, bool):
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if not math.isfinite(number) or isinstance(value, str):
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt in ("", "none") else f"{metric}_{filt}"
                out.setdefault(f"{prefix}/{task}/{name}", number)
    return out


def write_results_json(results: dict, path: str | os.PathLike) -> Path:
    """Write lm-eval results atomically (temp file in the same folder, fsync, `os.replace`); returns the path.

    The JSON is fully serialized before any file is touched, so a failure never leaves a partial file or replaces
    an existing one. Per-sample logs (`results["samples"]`) go to a sibling `<stem>_samples.json`.
    """
    handle_non_serializable = optional_lm_eval("utils").handle_non_serializable

    path = Path(path)
    body = {k: v for k, v in results.items() if k != "samples"}
    text = json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False)
    samples_text = None
    if results.get("samples"):
        samples_text = json.dumps(results["samples"], default=handle_non_serializable, ensure_ascii=False)
    atomic_write_text(path, text)
    if samples_text is not None:
        atomic_write_text(path.with_name(f"{path.stem}_samples.json"), samples_text)
    log.info("lm-eval results written to %s", path)
    return path
