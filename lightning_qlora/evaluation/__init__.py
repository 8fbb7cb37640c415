"""lm-eval bridge: score a live (QLoRA) Lightning module with lm-evaluation-harness, offline-friendly.

Public API (imported lazily, so `import lightning_qlora.evaluation` stays cheap):

- `LightningLM`: lm-eval `TemplateLM` over a module's `.model` / `.tokenizer` (HFLM-identical numbers).
- `evaluate`, `format_results_table`, `flatten_metrics`, `write_results_json`: run tasks and handle results.
- `LMEvalCallback`: evaluate during/after `Trainer.fit`, log to every logger, write JSON next to checkpoints.
- `build_task_manager`, `validate_tasks`, `demo_task_include_path`, `mmlu_subjects`, `EvaluationError`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LightningLM": "lightning_qlora.evaluation.lm",
    "evaluate": "lightning_qlora.evaluation.run",
    "format_results_table": "lightning_qlora.evaluation.run",
    "flatten_metrics": "lightning_qlora.evaluation.run",
    "write_results_json": "lightning_qlora.evaluation.run",
    "LMEvalCallback": "lightning_qlora.evaluation.callback",
    "EvaluationError": "lightning_qlora.evaluation.tasks",
    "TaskSetup": "lightning_qlora.evaluation.tasks",
    "build_task_manager": "lightning_qlora.evaluation.tasks",
    "validate_tasks": "lightning_qlora.evaluation.tasks",
    "load_tasks": "lightning_qlora.evaluation.tasks",
    "demo_task_include_path": "lightning_qlora.evaluation.tasks",
    "mmlu_subjects": "lightning_qlora.evaluation.tasks",
    "write_mmlu_include": "lightning_qlora.evaluation.tasks",
    "DEMO_TASK": "lightning_qlora.evaluation.tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
