"""Offline task resolution: local MMLU copy (57-subject stand-in), demo task, results helpers, bad inputs."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from conftest import build_tiny_llama

from lightning_qlora.evaluation import (
    DEMO_TASK,
    EvaluationError,
    build_task_manager,
    demo_task_include_path,
    evaluate,
    flatten_metrics,
    format_results_table,
    mmlu_subjects,
    validate_tasks,
    write_results_json,
)
from lightning_qlora.evaluation.tasks import load_demo_mc_dataset


def _write_mmlu_copy(root, subjects, readme=True, splits=(("dev", 5), ("test", 2))):
    """cais/mmlu hub-snapshot layout: DIR/README.md (configs) + DIR/<subject>/<split>-00000-of-00001.parquet."""
    import datasets

    for s in subjects:
        (root / s).mkdir(parents=True, exist_ok=True)
        for split, n in splits:
            rows = [
                {"question": f"{s} question {i}?", "subject": s, "choices": ["w", "x", "y", "z"], "answer": i % 4}
                for i in range(n)
            ]
            datasets.Dataset.from_list(rows).to_parquet(str(root / s / f"{split}-00000-of-00001.parquet"))
    if readme:
        configs = "".join(
            f"- config_name: {s}\n  data_files:\n"
            + "".join(f"  - split: {sp}\n    path: {s}/{sp}-*\n" for sp, _ in splits)
            for s in subjects
        )
        (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# MMLU stand-in\n")
    return root


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    return _write_mmlu_copy(tmp_path_factory.mktemp("mmlu"), list(mmlu_subjects()))


def test_subject_list_comes_from_lm_eval():
    subjects = mmlu_subjects()
    assert len(subjects) == 57 and "abstract_algebra" in subjects
    assert set(subjects.values()) == {
        f"{c}_tasks" for c in ("mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")
    }


def test_local_mmlu_layout_loads_with_datasets_offline(mmlu_dir):
    import datasets

    ds = datasets.load_dataset(str(mmlu_dir), name="anatomy")
    assert ds["dev"].num_rows == 5 and ds["test"].num_rows == 2


def test_mmlu_from_local_copy(mmlu_dir, tiny_tokenizer):
    setup = build_task_manager("mmlu", mmlu_path=mmlu_dir)
    assert setup.tasks == ["mmlu"] and not any("lm_eval/tasks" == p for p in setup.include_paths)
    generated = [p for p in setup.include_paths if "lightning_qlora_lm_eval" in p][0]
    cfg = open(os.path.join(generated, "mmlu_anatomy.yaml")).read()
    assert str(mmlu_dir) in cfg and "mmlu/default/mmlu_anatomy.yaml" in cfg  # includes lm-eval's official YAML

    results = evaluate(
        build_tiny_llama(), ["mmlu"], tokenizer=tiny_tokenizer, num_fewshot=1, limit=1, mmlu_path=mmlu_dir
    )
    assert results["configs"]["mmlu_abstract_algebra"]["dataset_path"] == str(mmlu_dir)
    assert results["configs"]["mmlu_abstract_algebra"]["doc_to_text"].startswith("{{question.strip()}}")
    subtasks = [k for k in results["results"] if k.startswith("mmlu_") and k[5:] in mmlu_subjects()]
    assert len(subtasks) == 57
    metrics = flatten_metrics(results)
    for name in ("mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_abstract_algebra"):
        assert 0.0 <= metrics[f"lm_eval/{name}/acc"] <= 1.0
    assert not any("," in k for k in metrics)
    table = format_results_table(results)
    assert "abstract_algebra" in table and "humanities" in table


def test_mmlu_subject_without_readme(tmp_path, tiny_tokenizer):
    root = _write_mmlu_copy(tmp_path / "mmlu", ["abstract_algebra"], readme=False)
    results = evaluate(
        build_tiny_llama(), "mmlu_abstract_algebra", tokenizer=tiny_tokenizer, num_fewshot=5, mmlu_path=root
    )
    assert results["n-shot"]["mmlu_abstract_algebra"] == 5
    assert results["results"]["mmlu_abstract_algebra"]["sample_len"] == 2
    with pytest.raises(EvaluationError, match=r"lacks 56 MMLU subject\(s\)"):
        validate_tasks(["mmlu"], mmlu_path=root)
    with pytest.raises(EvaluationError, match="num_fewshot=6 .* only 5"):
        evaluate(build_tiny_llama(), "mmlu_abstract_algebra", tokenizer=tiny_tokenizer, num_fewshot=6, mmlu_path=root)


def test_demo_task(tiny_tokenizer):
    folder = demo_task_include_path()
    assert (folder / f"{DEMO_TASK}.yaml").is_file()
    ds = load_demo_mc_dataset()
    assert ds["dev"].num_rows == 5 and ds["test"].num_rows == 40
    assert sorted({r["answer"] for r in ds["test"]}) == [0, 1, 2, 3]
    assert all(len(r["choices"]) == 4 for r in ds["test"])
    assert validate_tasks(DEMO_TASK) == [DEMO_TASK]
    results = evaluate(build_tiny_llama(), [DEMO_TASK], tokenizer=tiny_tokenizer, num_fewshot=5, limit=8)
    assert set(flatten_metrics(results)) >= {f"lm_eval/{DEMO_TASK}/acc", f"lm_eval/{DEMO_TASK}/acc_stderr"}


def test_bad_inputs(tmp_path, tiny_tokenizer, mmlu_dir):
    with pytest.raises(EvaluationError, match=r"unknown lm-eval task 'mmlu_abstract_algebr'.*mmlu_abstract_algebra"):
        validate_tasks(["mmlu_abstract_algebr"])
    with pytest.raises(EvaluationError, match=r"unknown lm-eval task 'qlora_demo'.*qlora_demo_mc"):
        validate_tasks("qlora_demo")
    with pytest.raises(EvaluationError, match="mmlu_path .* does not exist"):
        validate_tasks(["mmlu"], mmlu_path=tmp_path / "nowhere")
    with pytest.raises(EvaluationError, match="include_path .* is not a directory"):
        validate_tasks([DEMO_TASK], include_path=tmp_path / "missing")
    with pytest.raises(EvaluationError, match="no tasks"):
        validate_tasks([])
    with pytest.raises(EvaluationError, match="num_fewshot=6 but task 'qlora_demo_mc' has only 5"):
        evaluate(build_tiny_llama(), [DEMO_TASK], tokenizer=tiny_tokenizer, num_fewshot=6)
    with pytest.raises(EvaluationError, match="limit"):
        evaluate(build_tiny_llama(), [DEMO_TASK], tokenizer=tiny_tokenizer, limit=0)
    partial = tmp_path / "partial"
    shutil.copytree(mmlu_dir / "anatomy", partial / "anatomy")
    with pytest.raises(EvaluationError, match="lacks 56") as info:
        validate_tasks(["mmlu"], mmlu_path=partial)
    assert "\n" not in str(info.value)


def test_flatten_metrics():
    results = {
        "results": {
            "taskA": {"alias": "A", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 1, "sample_len": 4},
            "gsm": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A", "x,none": float("nan")},
            "grp": {"acc,none": 0.4, "acc_stderr,none": 0.02, "flag,none": True},
        },
        "groups": {"grp": {"acc,none": 0.4, "acc_stderr,none": 0.02}},
    }
    assert flatten_metrics(results) == {
        "lm_eval/taskA/acc": 0.5,
        "lm_eval/taskA/acc_stderr": 0.1,
        "lm_eval/taskA/acc_norm": 1.0,
        "lm_eval/gsm/exact_match_strict-match": 0.25,
        "lm_eval/grp/acc": 0.4,
        "lm_eval/grp/acc_stderr": 0.02,
    }
    assert flatten_metrics({}) == {} and format_results_table({}) == ""


def test_write_results_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out" / "r.json"
    write_results_json({"results": {"t": {"acc,none": 0.5}}, "samples": {"t": [{"doc_id": 0}]}}, path)
    assert json.loads(path.read_text())["results"]["t"]["acc,none"] == 0.5
    assert "samples" not in json.loads(path.read_text())
    assert json.loads((tmp_path / "out" / "r_samples.json").read_text()) == {"t": [{"doc_id": 0}]}
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_results_json({"results": {"t": {"acc,none": math.pi}}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json", "r_samples.json"]  # no temp files left
