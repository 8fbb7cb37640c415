"""Every recipe parses, starts with the command that runs it, and instantiates on a tiny stand-in model."""

import json
import re
import sys
from pathlib import Path

import pytest

from lightning_qlora.cli.main import QLoRACLI, main

RECIPES = sorted(Path(__file__).parents[2].joinpath("recipes").rglob("*.yaml"))


def test_every_recipe_the_readme_names_exists_and_every_recipe_is_named():
    readme = RECIPES[0].parents[2].joinpath("README.md").read_text()
    named = set()
    for path in re.findall(r"`(recipes/[^`]+\.yaml)`", readme):
        stem, _, rest = path.partition("{")
        choices, _, tail = rest.partition("}")
        named |= {f"{stem}{c}{tail}" for c in choices.split(",")} if rest else {path}
    root = RECIPES[0].parents[2]
    assert named, "the README lists no recipe"
    assert sorted(p for p in named if not (root / p).is_file()) == []
    assert sorted(str(p.relative_to(root)) for p in RECIPES if str(p.relative_to(root)) not in named) == []


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_starts_with_its_command_and_prints_config(recipe, capsys):
    first = recipe.read_text().splitlines()[0]
    assert first == f"# lightning-qlora fit --config recipes/{recipe.parent.name}/{recipe.name}"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "lightning_qlora.NF4Precision" in out and "lightning_qlora.LoRA" in out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_instantiates_and_steps_on_tiny_model(recipe, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}."}) + "\n" for i in range(12))
    )
    cli = QLoRACLI(
        run=False,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=[
            "--config",
            str(recipe),
            f"--model.init_args.model={tiny_llama_dir}",
            f"--data.init_args.path={rows}",
            "--data.init_args.val_path=null",
            "--data.init_args.val_split=4",
            "--data.init_args.batch_size=2",
            "--data.init_args.format=auto",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.limit_val_batches=1",
            "--trainer.accumulate_grad_batches=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ],
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    assert (tmp_path / "runs").is_dir()
