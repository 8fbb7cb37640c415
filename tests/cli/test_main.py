"""`lightning-qlora` end to end on a tiny local model, and its one-line errors for bad input."""

import json
import logging
import sys

import pytest
import yaml

from lightning_qlora.cli.main import main


@pytest.fixture()
def recipe(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}."}) + "\n" for i in range(16)
        )
    )
    config = {
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": -1,
            "plugins": [{"class_path": "lightning_qlora.NF4Precision"}],
            "strategy": {"class_path": "lightning_qlora.PagedOptimizerStrategy"},
            "callbacks": [
                {
                    "class_path": "lightning_qlora.LoRA",
                    "init_args": {"r": 8, "alpha": 16, "export_dir": str(tmp_path / "adapter")},
                },
                {"class_path": "lightning_qlora.RunSummary"},
            ],
        },
        "model": {"class_path": "lightning_qlora.CausalLM", "init_args": {"model": str(tiny_llama_dir), "lr": 5e-3}},
        "data": {
            "class_path": "lightning_qlora.InstructionDataModule",
            "init_args": {"path": str(rows), "max_length": 64, "batch_size": 4, "val_split": 4},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def test_fit_writes_adapter_and_summary(recipe, tmp_path, capsys):
    main(["fit", "--config", str(recipe)])
    out = capsys.readouterr().out
    assert "held-out loss before" in out and "held-out loss after" in out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_history"][0]["step"] == 0 and len(summary["val_history"]) >= 2


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("lightning-qlora: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_recipe_key(recipe, capsys):
    code, _, err = run_cli(["fit", "--config", str(recipe), "--data.init_args.max_lenght", "3"], capsys)
    assert code == 2 and "max_lenght" in one_error_line(err)


def test_missing_recipe_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    code, _, err = run_cli(["fit", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in one_error_line(err)


def test_missing_model_path(recipe, tmp_path, capsys):
    code, _, err = run_cli(["fit", "--config", str(recipe), "--model.init_args.model", str(tmp_path / "no")], capsys)
    assert code == 2 and "does not exist" in one_error_line(err)


def test_malformed_data_row_names_the_line_and_overwrites_nothing(recipe, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    lines = rows.read_text().splitlines()
    lines[2] = '{"instruction": "broken", '
    rows.write_text("\n".join(lines) + "\n")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("previous")
    code, _, err = run_cli(["fit", "--config", str(recipe)], capsys)
    assert code == 2 and "line 3" in one_error_line(err)
    assert (adapter / "adapter_config.json").read_text() == "previous"


def test_empty_data_file(recipe, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text("")
    code, _, err = run_cli(["fit", "--config", str(recipe)], capsys)
    assert code == 2 and "empty" in one_error_line(err)


def test_max_length_smaller_than_prompt(recipe, capsys):
    code, _, err = run_cli(["fit", "--config", str(recipe), "--data.init_args.max_length", "8"], capsys)
    line = one_error_line(err)
    assert code == 2 and "max_length is 8" in line


def test_evaluate_prints_lm_eval_table_with_adapter(recipe, tmp_path, capsys):
    main(["fit", "--config", str(recipe)])
    capsys.readouterr()
    main(
        [
            "evaluate",
            "--config",
            str(recipe),
            "--tasks",
            "qlora_demo_mc",
            "--num_fewshot",
            "0",
            "--limit",
            "8",
            "--adapter",
            str(tmp_path / "adapter"),
            "--output_path",
            str(tmp_path / "eval.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "qlora demo" in out and "acc" in out  # lm-eval prints the task alias
    results = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= results["results"]["qlora_demo_mc"]["acc,none"] <= 1.0


def test_evaluate_unknown_task_is_one_line(recipe, capsys):
    # lm-eval's own spelling, comma-separated (a YAML list, --tasks=[a,b], works too: tests/cli/test_bad_inputs.py)
    code, _, err = run_cli(["evaluate", "--config", str(recipe), "--tasks", "qlora_demo_mc,qlora_demo_mcc"], capsys)
    line = one_error_line(err)
    assert code == 2 and "unknown lm-eval task 'qlora_demo_mcc'; did you mean: qlora_demo_mc?" in line


# ----------------------------------------------------------------------------- memory (the planner)
def test_memory_prints_the_plan_of_the_recipe(recipe, capsys):
    main(["memory", "--config", str(recipe)])
    out = capsys.readouterr().out
    assert "batch 4 x 64" in out and "checkpointing off" in out
    for label in ("4-bit base weights", "LoRA adapters", "r=8", "paged_adamw_32bit", "predicted peak"):
        assert label in out


def test_memory_overrides_budget_and_json(recipe, capsys):
    main(["memory", "--config", str(recipe), "--data.init_args.batch_size=16", "--budget", "1KiB"])
    out = capsys.readouterr().out
    assert "batch 16 x 64" in out and "MiB" in out and "over the budget of 0.0 MiB" in out
    assert "turn gradient checkpointing on" in out
    main(["memory", "--config", str(recipe), "--json", "--devices", "2", "--sharding", "fsdp", "--budget", "80GiB"])
    payload = json.loads(capsys.readouterr().out)
    assert payload["settings"]["devices"] == 2 and payload["settings"]["sharding"] == "fsdp"
    assert payload["advice"] == [] and payload["peak"] < payload["total"] or payload["paged_optimizer_states"] == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--budget", "lots"], "is not a size"),
        (["--trainer"], "overrides look like"),
        ([], None),
    ],
)
def test_memory_bad_input_is_one_line(recipe, capsys, args, fragment):
    argv = ["memory"] + (["--config", str(recipe)] if args else []) + args
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert (fragment or "--config") in one_error_line(err)


def test_a_checkpoint_path_resumes_with_the_configs_model_arguments(recipe, tmp_path, capsys):
    """``--ckpt_path FILE`` resumes the model the config and command line describe, as ``--ckpt_path last`` does."""
    import torch

    main(["fit", "--config", str(recipe), "--trainer.max_steps=2"])
    (first,) = (tmp_path / "run").rglob("*.ckpt")
    kept = tmp_path / "step2.ckpt"
    kept.write_bytes(first.read_bytes())
    capsys.readouterr()
    main(["fit", "--config", str(recipe), f"--ckpt_path={kept}", "--trainer.max_steps=3", "--model.init_args.lr=0.05"])
    err = capsys.readouterr().err
    assert f"resuming {kept} with the config's model arguments: lr=0.05 (trained with 0.005)" in err, err
    assert "betas" not in err  # the config's list and the checkpoint's tuple are the same betas
    newest = max((tmp_path / "run").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    saved = torch.load(newest, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and saved["hyper_parameters"]["lr"] == 0.05


def test_config_yaml_is_the_recipe_of_the_run_that_trained(recipe, tmp_path, capsys):
    """Written after the first optimizer step: a run that trains nothing leaves the folder's config.yaml alone."""
    saved = tmp_path / "run" / "config.yaml"
    main(["fit", "--config", str(recipe), "--trainer.max_steps=1", "--model.init_args.lr=0.004"])
    assert yaml.safe_load(saved.read_text())["model"]["init_args"]["lr"] == 0.004
    before = saved.read_bytes()
    main(["fit", "--config", str(recipe), "--trainer.max_steps=-1", "--trainer.max_epochs=0",
          "--model.init_args.lr=0.5"])  # fmt: skip
    assert saved.read_bytes() == before
    main(["fit", "--config", str(recipe), "--trainer.max_steps=1", "--model.init_args.lr=0.003"])
    assert yaml.safe_load(saved.read_text())["model"]["init_args"]["lr"] == 0.003


def test_top_level_help_names_every_command(capsys):
    """``lightning-qlora --help`` lists the commands that are not Lightning subcommands too (each answers --help)."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for command in ("fit", "evaluate", "generate", "chat", "serve", "export", "memory"):
        assert command in text
    levels = {name: logging.getLogger(name).level for name in ("lightning.pytorch", "lightning_qlora")}
    for command in ("generate", "chat", "serve", "export", "memory"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"lightning-qlora {command}" in capsys.readouterr().out
    # run in-process, a command leaves the loggers as found (chat quiets Lightning's info lines only while it runs)
    assert {name: logging.getLogger(name).level for name in levels} == levels
