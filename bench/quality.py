"""What 4 bits cost: the demo fine-tune as 16-bit LoRA, NF4 + DQ, NF4, FP4 and NF4 + DQ with a LoftQ init.

Each variant is the demo recipe (recipes/demo/smollm2-135m-faq.yaml: same model, data, seed, steps, optimizer, LoRA
shape) with only the base's storage (and, for the LoftQ run, the adapters' init) changed, fitted in a fresh
interpreter. For each: held-out loss before and after (the recipe's full validation pass at step 0 and at the end),
the demo multiple-choice task before and after, in lm-eval's MMLU letter format (``qlora_demo_mc``, what the recipe
reports) and as a cloze task (the same 40 questions, each answer's own text scored, ``acc_norm``: letter-format
MMLU sits at chance for models this small), the letters the model picks, and the wall time. A base stage scores the
base models alone 5-shot in the letter format (the issue's setting; their 0-shot scores are each run's "before").

    python bench/quality.py                                   # everything, compute dtype "auto"
    python bench/quality.py --compute-dtype fp32 --threads 1 --jobs 3 --json q.json   # a shared 2-core CPU
    python bench/quality.py --variants nf4-dq,nf4-dq-loftq --skip-base --steps 10 --limit 8   # a quick look

``--compute-dtype`` is the 16-bit baseline's dtype and the 4-bit variants' compute dtype: ``auto`` is bf16 on GPUs
and CPUs that compute it natively, fp32 on CPUs that only emulate it (about 40x slower there), so say which.
``--jobs`` runs that many fits at once (wall times then share the machine); ``--threads`` sets torch's threads per run.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "demo" / "smollm2-135m-faq.yaml"
TASKS = ("qlora_demo_mc", "qlora_demo_mc_cloze")

VARIANTS: dict[str, dict[str, Any]] = {
    "lora-16bit": {"label": "(a) 16-bit LoRA, unquantized base", "quant": None},
    "nf4-dq": {"label": "(b) NF4 + DQ (QLoRA)", "quant": {"quant_type": "nf4", "double_quant": True}},
    "nf4": {"label": "(c) NF4, no DQ", "quant": {"quant_type": "nf4", "double_quant": False}},
    "fp4": {"label": "(d) FP4, no DQ", "quant": {"quant_type": "fp4", "double_quant": False}},
    "nf4-dq-loftq": {
        "label": "(e) NF4 + DQ, LoftQ init",
        "quant": {"quant_type": "nf4", "double_quant": True},
        "lora": {"init": "loftq"},
    },
}

BASES: dict[str, dict[str, Any] | None] = {
    "unquantized": None,
    "nf4-dq": {"quant_type": "nf4", "double_quant": True},
    "nf4": {"quant_type": "nf4", "double_quant": False},
    "fp4": {"quant_type": "fp4", "double_quant": False},
}

CLOZE_YAML = """\
# qlora_demo_mc as a cloze task: each answer's own text is scored after "Answer:" (acc_norm: per byte)
task: qlora_demo_mc_cloze
custom_dataset: !function lightning_qlora.evaluation.tasks.load_demo_mc_dataset
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "Question: {{question.strip()}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


# ------------------------------------------------------------------ scoring (used in the child processes)
def task_folder() -> Path:
    """A folder holding the cloze task's YAML (the letter task ships with the package)."""
    folder = Path(tempfile.mkdtemp(prefix="quality_tasks_"))
    (folder / "qlora_demo_mc_cloze.yaml").write_text(CLOZE_YAML)
    return folder


def score(
    module: Any, num_fewshot: int, include: Path, tokenizer: Any = None, tasks: tuple[str, ...] = TASKS
) -> dict[str, Any]:
    """Accuracy of the task forms and the letters picked (letter form), through lightning_qlora's evaluator."""
    from lightning_qlora.evaluation import evaluate

    limit = int(os.environ.get("QUALITY_LIMIT", "0")) or None  # --limit: a quick look at a few questions
    results = evaluate(
        module, list(tasks), num_fewshot=num_fewshot, include_path=include, batch_size=16, log_samples=True,
        tokenizer=tokenizer, limit=limit,
    )  # fmt: skip
    out: dict[str, Any] = {task: {"acc": float("nan"), "acc_norm": float("nan")} for task in TASKS}
    for task in tasks:
        metrics = results["results"][task]
        out[task] = {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}
        if task == "qlora_demo_mc":
            samples = results["samples"][task]
            picks = collections.Counter(
                "ABCD"[max(range(4), key=lambda i, s=s: float(s["resps"][i][0][0]))] for s in samples
            )
            out[task]["picks"] = "".join(f"{k}{picks.get(k, 0)} " for k in "ABCD").strip()
    return out


def quant_config(spec: dict[str, Any], compute_dtype: torch.dtype) -> Any:
    from lightning_qlora.quantization.nf4 import QuantizationConfig

    return QuantizationConfig(compute_dtype=compute_dtype, **spec)


def run_base_probe(model: str, compute_dtype: torch.dtype, out: Path) -> None:
    """Score the base models alone (no adapters), 5-shot in the letter format (the issue's setting).

    The 0-shot scores of the same bases are each variant's "before" (the same model, task and settings). With a
    bf16 compute dtype NF4 + DQ is also scored in fp32 (and the other way round where bf16 is native).
    """
    from transformers import AutoTokenizer

    from lightning_qlora.models.sources import load_causal_lm, resolve_model_dir

    model_dir = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    include = task_folder()
    from lightning_qlora.utils.dtypes import fast_compute_dtype

    cases = [(name, spec, compute_dtype) for name, spec in BASES.items()]
    other = torch.float32 if compute_dtype != torch.float32 else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if other == torch.float32 or fast_compute_dtype(device) == torch.bfloat16:  # emulated bf16: ~40x slower, skipped
        cases.append((f"nf4-dq ({str(other).removeprefix('torch.')} compute)", BASES["nf4-dq"], other))
    rows = []
    for name, spec, dtype in cases:
        quant = quant_config(spec, dtype) if spec is not None else None
        net = load_causal_lm(model_dir, quantization=quant, dtype=dtype).eval()
        for shots in (5,):
            start = time.perf_counter()
            row = {"base": name, "compute_dtype": str(dtype).removeprefix("torch."), "shots": shots}
            row.update(score(net, shots, include, tokenizer, tasks=TASKS[:1]))
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del net
    out.write_text(json.dumps(rows, indent=2))


def variant_config(name: str, compute_dtype: str, steps: int | None, workdir: Path) -> dict[str, Any]:
    """The demo recipe with this variant's storage, outputs under ``workdir`` and no checkpoint/lm-eval callbacks."""
    spec = VARIANTS[name]
    config = yaml.safe_load(RECIPE.read_text())
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(workdir)
    if steps is not None:
        trainer["max_steps"] = steps
        trainer["val_check_interval"] = min(trainer["val_check_interval"], steps)
    trainer["logger"] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(workdir), "name": "csv"}}
    ]
    keep = []
    for callback in trainer["callbacks"]:
        short = callback["class_path"].rsplit(".", 1)[-1]
        if short == "LoRA":
            callback = copy.deepcopy(callback)
            callback["init_args"]["export_dir"] = str(workdir / "adapter")
            callback["init_args"].update(spec.get("lora", {}))
        if short not in ("LMEvalCallback", "ResumableCheckpoint"):  # scored by this script; no 225 MB checkpoints
            keep.append(callback)
    trainer["callbacks"] = keep
    trainer["enable_checkpointing"] = False
    config["model"]["init_args"]["dtype"] = compute_dtype
    if spec["quant"] is None:
        trainer.pop("plugins", None)
        trainer["precision"] = "bf16-mixed" if compute_dtype == "bf16" else "32-true"
    else:
        plugin = trainer["plugins"][0]
        plugin["init_args"] = {**plugin.get("init_args", {}), "compute_dtype": compute_dtype, **spec["quant"]}
    return config


def run_variant(config_path: Path, out: Path) -> None:
    """Fit one variant from its YAML (the lightning-qlora CLI's own classes) and score it before and after."""
    import lightning.pytorch as pl

    from lightning_qlora.cli.main import OneLineErrorParser, QLoRACLI, QLoRATrainer
    from lightning_qlora.cli.recipe import RECIPE_CLI_ARGS

    include = task_folder()
    record: dict[str, Any] = {"eval_seconds": 0.0}

    class Scores(pl.Callback):
        def _score(self, key: str, pl_module: pl.LightningModule) -> None:
            start = time.perf_counter()
            record[key] = score(pl_module, 0, include)
            record["eval_seconds"] += time.perf_counter() - start

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._score("before", pl_module)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._score("after", pl_module)

    cli = QLoRACLI(
        **RECIPE_CLI_ARGS,
        trainer_class=QLoRATrainer,
        parser_class=OneLineErrorParser,
        run=False,
        args=["--config", str(config_path)],
    )
    cli.trainer.callbacks.append(Scores())
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    record["train_seconds"] = round(record["wall_seconds"] - record["eval_seconds"], 1)
    record["val_history"] = [[int(s), float(v)] for s, v in cli.model.val_history]
    record["steps"] = int(cli.trainer.global_step)
    out.write_text(json.dumps(record, indent=2))


# ------------------------------------------------------------------ the parent: one child per stage
def run_children(jobs: list[tuple[str, list[str], Path]], parallel: int) -> set[str]:
    """Run this script once per job in fresh interpreters (own memory, own timing), ``parallel`` at a time.

    Args:
        jobs: ``(name, arguments, log file)`` per child; its output goes to the log.
        parallel: how many children run at once.

    Returns:
        The names of the jobs that succeeded.
    """
    waiting, running, done = list(jobs), [], set()
    while waiting or running:
        while waiting and len(running) < parallel:
            name, argv, log = waiting.pop(0)
            handle = open(log, "w")
            cmd = [sys.executable, str(Path(__file__)), *argv]
            running.append((name, subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT), handle, log))
        time.sleep(2)
        for job in [j for j in running if j[1].poll() is not None]:
            name, proc, handle, log = job
            handle.close()
            running.remove(job)
            if proc.returncode:
                tail = log.read_text().strip().splitlines()[-3:]
                print(f"  {name} FAILED (exit {proc.returncode}, see {log}): {tail}", flush=True)
            else:
                done.add(name)
                print(f"  {name} done", flush=True)
    return done


def fmt_loss(history: list[list[float]], last: bool) -> str:
    return f"{history[-1 if last else 0][1]:.4f}" if history else "n/a"


def fmt_scores(scores: dict[str, Any] | None, task: str, metric: str) -> str:
    return f"{scores[task][metric]:.3f}" if scores else "n/a"


def table(variants: dict[str, dict[str, Any]], base: list[dict[str, Any]] | None) -> str:
    lines = [
        "| variant | held-out loss before → after | MC letter acc before → after (picks after) | MC cloze acc_norm "
        "before → after | train time | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for name in [n for n in VARIANTS if n in variants]:
        r = variants[name]
        h = r["val_history"]
        b, a = r.get("before"), r.get("after")
        lines.append(
            f"| {VARIANTS[name]['label']} | {fmt_loss(h, False)} → {fmt_loss(h, True)} "
            f"| {fmt_scores(b, TASKS[0], 'acc')} → {fmt_scores(a, TASKS[0], 'acc')} "
            f"({a[TASKS[0]]['picks'] if a else ''}) "
            f"| {fmt_scores(b, TASKS[1], 'acc_norm')} → {fmt_scores(a, TASKS[1], 'acc_norm')} "
            f"| {r['train_seconds']:.0f} s | {r['wall_seconds']:.0f} s |"
        )
    if base:
        lines += ["", "| base model (no adapters) | compute | shots | MC letter acc (picks) | MC cloze acc_norm |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for row in base:
            lines.append(
                f"| {row['base']} | {row['compute_dtype']} | {row['shots']} | {row[TASKS[0]]['acc']:.3f} "
                f"({row[TASKS[0]]['picks']}) | {row[TASKS[1]]['acc_norm']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's max_steps (default: as is)")
    parser.add_argument("--skip-base", action="store_true", help="skip the base-model stage")
    parser.add_argument("--limit", type=int, default=0, help="score only this many questions (a quick look)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's own)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1: one after the other)")
    parser.add_argument("--workdir", default=None, help="outputs (default: a temp folder)")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--_variant", nargs=2, metavar=("YAML", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--_base", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from lightning_qlora.utils.dtypes import to_dtype

    dtype = to_dtype(args.compute_dtype)
    if args.threads:  # a machine shared with other jobs: one thread per run avoids OpenMP threads waiting on each other
        torch.set_num_threads(args.threads)
    if args._variant:
        return run_variant(Path(args._variant[0]), Path(args._variant[1]))
    if args._base:
        return run_base_probe(args._base[0], dtype, Path(args._base[1]))

    sys.path.insert(0, str(HERE))
    from measure import device_name, versions

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench/quality.py: unknown variant {unknown[0]!r}; use {', '.join(VARIANTS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="quality_"))
    workdir.mkdir(parents=True, exist_ok=True)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    recipe = yaml.safe_load(RECIPE.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {
        "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]),
        "compute_dtype": dtype_name,
        "device": device_name(device),
        "threads": args.threads or torch.get_num_threads(),
        "jobs": args.jobs,
        "versions": versions(("transformers", "lightning", "bitsandbytes", "peft", "lm_eval")),
        "recipe": str(RECIPE.relative_to(HERE.parent)),
        "seed": recipe["seed_everything"],
        "steps": args.steps or recipe["trainer"]["max_steps"],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(meta, indent=2), flush=True)
    if args.limit:
        os.environ["QUALITY_LIMIT"] = str(args.limit)
    threads = ["--threads", str(args.threads)] if args.threads else []
    jobs = []
    for name in names:
        run_dir = workdir / name
        run_dir.mkdir(exist_ok=True)
        config_path = run_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(variant_config(name, dtype_name, args.steps, run_dir), sort_keys=False))
        print(f"{VARIANTS[name]['label']}: log {run_dir / 'fit.log'}", flush=True)
        jobs.append(
            (name, ["--_variant", str(config_path), str(run_dir / "result.json"), *threads], run_dir / "fit.log")
        )
    if not args.skip_base:
        print(f"base models: log {workdir / 'base.log'}", flush=True)
        argv = ["--_base", recipe["model"]["init_args"]["model"], str(workdir / "base.json"), "--compute-dtype"]
        jobs.append(("base", [*argv, dtype_name, *threads], workdir / "base.log"))
    done = run_children(jobs, args.jobs)
    results = {name: json.loads((workdir / name / "result.json").read_text()) for name in names if name in done}
    base = json.loads((workdir / "base.json").read_text()) if "base" in done else None
    print("\n" + table(results, base))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "variants": results, "base": base}, indent=2))


if __name__ == "__main__":
    main()
