"""Offline task resolution for lm-eval: name checks, local task folders, a local `cais/mmlu` copy, the demo task.

`--mmlu_path DIR` works by generating, into a small include folder, one task YAML per MMLU subject that
`include:`s lm-eval's official `mmlu/default/mmlu_<subject>.yaml` and only replaces `dataset_path` with the absolute
`DIR` (plus the official group YAMLs, also by `include:`). Prompts, few-shot sampling, task/group names and the
size-weighted aggregation stay lm-eval's; results keys are the same as an online run (`mmlu`, `mmlu_stem`, ...).
"""

from __future__ import annotations

import difflib
import functools
import glob
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_qlora.utils.atomic import atomic_write_text
from lightning_qlora.utils.imports import lm_eval as optional_lm_eval

log = logging.getLogger(__name__)

DEMO_TASK = "qlora_demo_mc"
MMLU_GROUP = "mmlu"
MMLU_CATEGORIES = ("mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")
MMLU_SPLITS = ("dev", "validation", "test")
_REQUIRED_SPLITS = ("dev", "test")
_GLOB_CHARS = set("*?[")


class EvaluationError(ValueError):
    """A bad evaluation input (task name, path, few-shot count, ...); the message says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line


# ---------------------------------------------------------------------------------------------- demo task
def demo_task_include_path() -> Path:
    """Folder with the packaged `qlora_demo_mc` task (pass it as `include_path`; it is also always searched)."""
    return Path(__file__).resolve().parent / "tasks_data"


def load_demo_mc_dataset(**_: Any):
    """`custom_dataset` for `qlora_demo_mc`: the packaged dev/test JSONL files as a `datasets.DatasetDict`."""
    import datasets

    folder = demo_task_include_path()
    splits = {}
    for split in ("dev", "test"):
        with open(folder / f"{DEMO_TASK}_{split}.jsonl", encoding="utf-8") as fh:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in fh if line.strip()])
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------- MMLU
def _lm_eval_mmlu_dir() -> Path:
    return Path(optional_lm_eval("tasks").__file__).resolve().parent / "mmlu" / "default"


@functools.lru_cache(maxsize=1)
def mmlu_subjects() -> dict[str, str]:
    """`{subject: category_tag}` for the 57 subjects, read from lm-eval's own mmlu task folder."""
    out = {}
    for path in sorted(_lm_eval_mmlu_dir().glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        out[cfg["dataset_name"]] = cfg["tag"]
    return out


def _mmlu_required_subjects(name: str) -> set[str] | None:
    """Subjects a requested task name needs from the local copy, or None if it is not an MMLU (default) name."""
    subjects = mmlu_subjects()
    if name == MMLU_GROUP:
        return set(subjects)
    tag = name if name.endswith("_tasks") else f"{name}_tasks"
    if name in MMLU_CATEGORIES or name in {f"{c}_tasks" for c in MMLU_CATEGORIES}:
        return {s for s, t in subjects.items() if t == tag}
    if name.startswith("mmlu_") and name[len("mmlu_") :] in subjects:
        return {name[len("mmlu_") :]}
    return None


def _readme_configs(root: Path) -> set[str]:
    """Config names declared in a hub-style README.md front matter (`configs: - config_name: ...`)."""
    readme = root / "README.md"
    if not readme.is_file():
        return set()
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return set()
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return set()
    return {c.get("config_name") for c in meta.get("configs") or [] if isinstance(c, dict)}


def _split_files(root: Path, subject: str, split: str) -> list[str]:
    return sorted(glob.glob(str(root / subject / f"{split}-*.parquet")))


def _check_mmlu_dir(mmlu_path: str | os.PathLike, needed: set[str]) -> tuple[Path, bool, list[str]]:
    """Validate the local copy; return (absolute dir, has README configs, subjects present)."""
    root = Path(mmlu_path).expanduser().resolve()
    hint = "expected DIR/<subject>/{dev,test}-*.parquet (a snapshot of cais/mmlu, see docs/evaluation.md)"
    if not root.is_dir():
        raise EvaluationError(f"mmlu_path {str(root)!r} does not exist or is not a directory; {hint}")
    configs = _readme_configs(root)
    present = [s for s in mmlu_subjects() if all(_split_files(root, s, sp) for sp in _REQUIRED_SPLITS)]
    missing = sorted(needed - set(present))
    if missing:
        raise EvaluationError(
            f"mmlu_path {str(root)!r} lacks {len(missing)} MMLU subject(s) the tasks need "
            f"(e.g. {', '.join(missing[:5])}); {hint}"
        )
    use_readme = bool(configs) and needed <= configs
    if configs and not use_readme:
        log.warning("README.md in %s does not declare every needed subject; using the parquet files directly.", root)
    return root, use_readme, present


def _atomic_write_text(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # already there: keep its mtime so lm-eval's task cache stays valid
    atomic_write_text(path, text)


def write_mmlu_include(mmlu_path: str | os.PathLike, needed: Iterable[str] | None = None) -> Path:
    """Write (idempotently) the include folder that points lm-eval's default MMLU tasks at a local copy.

    The folder lives under the system temp dir, named by a hash of its inputs, so repeated calls (and DDP ranks)
    share it. All paths inside are absolute.
    """
    lm_eval = optional_lm_eval()

    needed_set = set(mmlu_subjects()) if needed is None else set(needed)
    root, use_readme, present = _check_mmlu_dir(mmlu_path, needed_set)
    official = _lm_eval_mmlu_dir()
    key = f"{root}|{use_readme}|{','.join(present)}|{official}|{getattr(lm_eval, '__version__', '')}"
    out = (
        Path(tempfile.gettempdir()) / "lightning_qlora_lm_eval" / f"mmlu_{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    )
    out.mkdir(parents=True, exist_ok=True)
    for group_yaml in sorted(official.glob("_mmlu*.yaml")):
        _atomic_write_text(out / group_yaml.name, yaml.safe_dump({"include": str(group_yaml)}))
    for subject in present:
        cfg: dict[str, Any] = {"include": str(official / f"mmlu_{subject}.yaml")}
        if use_readme:  # datasets.load_dataset(DIR, name=subject) resolves through README.md `configs:`
            cfg["dataset_path"] = str(root)
        else:  # plain folders: point the parquet builder at the split files
            cfg["dataset_path"] = "parquet"
            cfg["dataset_name"] = None
            files = {
                sp: str(root / subject / f"{sp}-*.parquet") for sp in MMLU_SPLITS if _split_files(root, subject, sp)
            }
            cfg["dataset_kwargs"] = {"data_files": files}
        _atomic_write_text(out / f"mmlu_{subject}.yaml", yaml.safe_dump(cfg, sort_keys=True))
    return out


# ---------------------------------------------------------------------------------------------- task manager
class _DropOverrideWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "overrides existing task" not in record.getMessage()


def _task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    """Cached per (folders, their YAML files + mtimes): lm-eval's full index takes seconds to build."""
    stamp = tuple((str(f), f.stat().st_mtime_ns) for p in include_paths for f in sorted(Path(p).rglob("*.yaml")))
    return _cached_task_manager(include_paths, include_defaults, stamp)


@functools.lru_cache(maxsize=8)
def _cached_task_manager(include_paths: tuple[str, ...], include_defaults: bool, _stamp: tuple):
    TaskManager = optional_lm_eval("tasks").TaskManager

    index_log = logging.getLogger("lm_eval.tasks._index")
    flt = _DropOverrideWarnings()
    index_log.addFilter(flt)
    try:
        return TaskManager(include_path=list(include_paths), include_defaults=include_defaults)
    finally:
        index_log.removeFilter(flt)


@dataclass
class TaskSetup:
    """Resolved tasks: the lm-eval `TaskManager` to use and the validated task specs."""

    manager: Any
    tasks: list[str]
    include_paths: list[str] = field(default_factory=list)


def _as_list(tasks: str | Sequence[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = [str(t).strip() for t in items if str(t).strip()]
    if not out:
        raise EvaluationError("no tasks given; pass e.g. tasks=['mmlu'] or --tasks mmlu")
    return out


def _is_yaml_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and Path(spec).expanduser().is_file()


@functools.lru_cache(maxsize=1)
def _default_task_texts() -> tuple[frozenset[str], tuple[str, ...]]:
    """Every word of lm-eval's task YAMLs, and the names on their ``task:``/``group:``/``tag:`` lines.

    A plain text scan (about 1 s for 14,000 files) where lm-eval's index parses every YAML (about 20 s on 2 cores):
    a name that is no word of any YAML cannot be a built-in task, so a typo is reported without the index.
    """
    root = Path(optional_lm_eval("tasks").__file__).parent
    texts = [f.read_text(encoding="utf-8", errors="ignore") for f in sorted(root.rglob("*.yaml"))]
    names = {m for text in texts for m in _NAME_LINE.findall(text)}
    words = frozenset(w for text in texts for w in re.findall(r"[\w.\-]+", text))
    return words, tuple(sorted(names))


_NAME_LINE = re.compile(r"^\s*[\"']?(?:task|group|tag)[\"']?\s*:\s*[\"']?([^\s\"'#\[\],]+)", re.M)


def _unknown(spec: str, names: Sequence[str]) -> EvaluationError:
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.6)
    hint = f"did you mean: {', '.join(close)}?" if close else "no similar names;"
    return EvaluationError(
        f"unknown lm-eval task {spec!r}; {hint} (pass include_path=DIR for local task YAMLs; "
        f"list names with `lm-eval ls tasks`)"
    )


def build_task_manager(
    tasks: str | Sequence[str],
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    mmlu_path: str | os.PathLike | None = None,
) -> TaskSetup:
    """Validate task names/paths and build the `TaskManager` that resolves them offline.

    Search order: lm-eval's built-in tasks (only indexed when a name needs them: that index takes seconds),
    then the packaged demo task, `include_path` folder(s), and the generated MMLU folder when `mmlu_path` is set
    (later entries win, so `mmlu`, `mmlu_stem`, `mmlu_<subject>` resolve to the local copy).

    Raises:
        EvaluationError: unknown task (with up to 5 close matches), missing `include_path`/`mmlu_path`, or a
            local MMLU copy without the subjects the tasks need.
    """
    specs = _as_list(tasks)
    paths = [str(demo_task_include_path())]
    extra = (
        [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) else include_path
    )
    for p in extra:
        path = Path(p).expanduser().resolve()
        if not path.is_dir():
            raise EvaluationError(f"include_path {str(path)!r} is not a directory; pass a folder of lm-eval task YAMLs")
        paths.append(str(path))

    if mmlu_path is not None:
        needed = set().union(*[s for spec in specs if (s := _mmlu_required_subjects(spec)) is not None])
        if needed:
            paths.append(str(write_mmlu_include(mmlu_path, needed)))
        else:
            _check_mmlu_dir(mmlu_path, set())
            log.warning("mmlu_path is set but none of %s is an MMLU task; it is ignored.", specs)

    resolved = [str(Path(s).expanduser().resolve()) if _is_yaml_path(s) else s for s in specs]
    quick = _task_manager(tuple(paths), False)
    if all(s in quick.task_index for s in resolved):
        return TaskSetup(manager=quick, tasks=resolved, include_paths=paths)

    for spec in resolved:  # a name no built-in YAML mentions: unknown, without building lm-eval's full index
        if spec not in quick.task_index and not _is_yaml_path(spec) and not _GLOB_CHARS & set(spec):
            if spec not in _default_task_texts()[0]:
                raise _unknown(spec, [*quick.all_tasks, *_default_task_texts()[1]])
    full = _task_manager(tuple(paths), True)
    for spec in resolved:
        if spec in full.task_index or _is_yaml_path(spec):
            continue
        if _GLOB_CHARS & set(spec) and full.match_tasks([spec]):
            continue
        raise _unknown(spec, full.all_tasks)
    expanded: list[str] = []
    for spec in resolved:
        matches = full.match_tasks([spec]) if _GLOB_CHARS & set(spec) and spec not in full.task_index else [spec]
        expanded.extend(m for m in matches if m not in expanded)
    return TaskSetup(manager=full, tasks=expanded, include_paths=paths)


def validate_tasks(
    tasks: str | Sequence[str],
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    mmlu_path: str | os.PathLike | None = None,
) -> list[str]:
    """Check task names and paths without loading any dataset; return the resolved task specs."""
    return build_task_manager(tasks, include_path=include_path, mmlu_path=mmlu_path).tasks


# ---------------------------------------------------------------------------------------------- loading
def _effective_fewshot(task: Any, num_fewshot: int | None) -> int:
    default = task.get_config("num_fewshot")
    if num_fewshot is not None and default != 0:  # lm-eval never overrides an explicit 0 in a task config
        return int(num_fewshot)
    return int(default or 0)


def _fewshot_split(task: Any) -> str | None:
    cfg = task.config
    split = getattr(getattr(task, "fewshot_cfg", None), "split", None) or getattr(cfg, "fewshot_split", None)
    if split:
        return split
    for name in ("training_split", "validation_split", "test_split"):
        if getattr(cfg, name, None):
            return getattr(cfg, name)
    return None


def check_num_fewshot(tasks: dict[str, Any], num_fewshot: int | None) -> None:
    """Raise if a task would need more few-shot examples than its few-shot split holds."""
    if num_fewshot is not None and num_fewshot < 0:
        raise EvaluationError(f"num_fewshot={num_fewshot} must be >= 0")
    for name, task in tasks.items():
        shots = _effective_fewshot(task, num_fewshot)
        if shots <= 0:
            continue
        docs = task.fewshot_docs()
        split = _fewshot_split(task)
        if docs is None:
            raise EvaluationError(f"task {name!r} has no few-shot split; use num_fewshot=0")
        available = len(docs)
        eval_split = task.config.test_split or task.config.validation_split
        if split is not None and split == eval_split:
            available -= 1  # the sampler never uses the document being evaluated
        if shots > available:
            raise EvaluationError(
                f"num_fewshot={shots} but task {name!r} has only {available} few-shot example(s) in split "
                f"{split!r}; pass num_fewshot<={available}"
            )


def load_tasks(setup: TaskSetup, num_fewshot: int | None = None) -> list[Any]:
    """Build the lm-eval Task/Group objects once (loads datasets), check `num_fewshot`, return top-level items."""
    try:
        loaded = setup.manager.load(list(setup.tasks))
    except EvaluationError:
        raise
    except Exception as err:  # dataset download/offline/cache errors from datasets or lm-eval
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise EvaluationError(
            f"could not load tasks {setup.tasks}: {type(err).__name__}: {first} "
            f"(offline? pass mmlu_path=DIR for MMLU or include_path=DIR with local data)"
        ) from err
    check_num_fewshot(loaded["tasks"], num_fewshot)
    groups = loaded.get("groups", {})
    children = {c for names in loaded.get("group_map", {}).values() for c in names}
    roots = [g for name, g in groups.items() if name not in children]
    grouped = {t.task_name for g in roots for t in g.get_all_tasks()}
    return roots + [t for name, t in loaded["tasks"].items() if name not in grouped]
