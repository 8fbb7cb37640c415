"""Bad input through `lightning-qlora`: each case ends in one error line naming the input, and overwrites nothing.

A good run first leaves an adapter, a checkpoint and a summary behind; every malformed config, data file, model
folder, adapter or checkpoint below must fail with one ``lightning-qlora: error: ...`` line (no traceback) that
names what was wrong, and leave those files byte-for-byte as they were. So must a run that would replace the
adapter with an untrained one, a second run into a folder a live run holds, a read-only output folder (exit 2), and
a disk that fills up while saving (exit 1; the earlier file on it is kept), and ``--ckpt_path last`` where the only
save was cut off by a kill (its partial file is removed). Cases needing a tmpfs skip without one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Forked, build_tiny_llama, hold_run_lock
from safetensors.torch import load_file, save_file

from lightning_qlora.cli.main import main


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama_dir) -> Path:
    """A folder with a good recipe, data, a model copy, and the outputs of a good 2-step run."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(tiny_llama_dir, root / "model")
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}."} for i in range(12)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "seed_everything": 3,
        "trainer": {
            "default_root_dir": str(root / "run"), "max_steps": 2, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 1,
            "plugins": [{"class_path": "lightning_qlora.NF4Precision"}],
            "strategy": {"class_path": "lightning_qlora.PagedOptimizerStrategy"},
            "callbacks": [
                {"class_path": "lightning_qlora.LoRA", "init_args": {"r": 8, "export_dir": str(root / "adapter")}},
                {"class_path": "lightning_qlora.ResumableCheckpoint",
                 "init_args": {"dirpath": str(root / "ckpts"), "every_n_train_steps": 1, "save_top_k": 0}},
                {"class_path": "lightning_qlora.RunSummary"},
            ],
        },
        "model": {"class_path": "lightning_qlora.CausalLM", "init_args": {"model": str(root / "model")}},
        "data": {"class_path": "lightning_qlora.InstructionDataModule",
                 "init_args": {"path": str(root / "rows.jsonl"), "max_length": 64, "batch_size": 2, "val_split": 2}},
    }  # fmt: skip
    (root / "good.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "argv", ["lightning-qlora"])
        main(["fit", "--config", str(root / "good.yaml")])
    assert (root / "adapter" / "adapter_model.safetensors").is_file() and (root / "ckpts" / "last.ckpt").is_file()
    return root


def protected(work: Path) -> dict[str, str]:
    files = [*sorted((work / "adapter").iterdir()), work / "ckpts" / "last.ckpt", work / "run" / "summary.json"]
    files += [work / "model" / "model.safetensors", work / "rows.jsonl"]
    files += sorted(p for p in (work / "mnt").rglob("*") if p.is_file())  # earlier files on a case's tmpfs
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


MOUNTS: list[Path] = []
CLEANED: list[Path] = []  # partial files a case expects the run to remove
HOLDERS: list[Forked] = []


@pytest.fixture(autouse=True)
def _unmount_and_stop():
    """Unmount a case's tmpfs and stop its lock-holding process after the case."""
    yield
    while HOLDERS:
        HOLDERS.pop().kill()
    while MOUNTS:
        subprocess.run(["umount", str(MOUNTS.pop())], check=False)


def tmpfs(w: Path, name: str, size: str = "1M", read_only: bool = False, holding: tuple[Path, ...] = ()) -> Path:
    """Mount a tmpfs of ``size`` at mnt/<name> (holding copies of ``holding``), read-only if asked; skips if refused."""
    folder = w / "mnt" / name
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip() or 'needs root'})")
    MOUNTS.append(folder)
    for path in holding:
        shutil.copytree(path, folder / path.name) if path.is_dir() else shutil.copy2(path, folder / path.name)
    if read_only and subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot remount the tmpfs read-only")
    return folder


def elsewhere(w: Path, name: str) -> Callable[[dict], None]:
    """A recipe edit sending checkpoints, adapter and root to cases/<name>-*: a run that trains overwrites nothing."""

    def edit(c):
        callback(c, "LoRA")["init_args"]["export_dir"] = str(w / "cases" / f"{name}-adapter")
        callback(c, "ResumableCheckpoint")["init_args"]["dirpath"] = str(w / "cases" / f"{name}-ckpts")
        c["trainer"]["default_root_dir"] = str(w / "cases" / f"{name}-run")

    return edit


def recipe(work: Path, edit: Callable[[dict], None] | None = None) -> str:
    config = yaml.safe_load((work / "good.yaml").read_text())
    if edit is not None:
        edit(config)
    path = work / "case.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def callback(config: dict, name: str) -> dict:
    return next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def copy_model(work: Path, name: str) -> Path:
    target = work / "cases" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(work / "model", target)
    return target


# ------------------------------------------------------------------------------------------------- the cases
# Each case builds its bad input in `work` and returns (command line, text the error line must contain).
def missing_config(w):
    return ["fit", "--config", str(w / "nope.yaml")], "nope.yaml"


def yaml_syntax_error(w):
    return ["fit", "--config", str(write(w / "cases" / "broken.yaml", "trainer: {max_steps: [1,\n"))], "broken.yaml"


def unknown_trainer_key(w):
    return ["fit", "--config", recipe(w), "--trainer.max_stepz=3"], "max_stepz"


def wrong_type_for_max_steps(w):
    return ["fit", "--config", recipe(w), "--trainer.max_steps=many"], "max_steps"


def unknown_model_class(w):
    return ["fit", "--config", recipe(w), "--model.class_path=lightning_qlora.NoSuchModel"], "NoSuchModel"


def trainer_precision_beside_nf4(w):
    return ["fit", "--config", recipe(w), "--trainer.precision=16-mixed"], "16-mixed was given beside the recipe's NF4"


def lora_rank_zero(w):
    return ["fit", "--config", recipe(w, lambda c: callback(c, "LoRA")["init_args"].update(r=0))], "r=0"


def lora_dropout_above_one(w):
    return ["fit", "--config", recipe(w, lambda c: callback(c, "LoRA")["init_args"].update(dropout=1.5))], "1.5"


def lora_targets_nothing(w):
    def edit(c):
        callback(c, "LoRA")["init_args"]["target_modules"] = ["no_such_proj"]

    return ["fit", "--config", recipe(w, edit)], "no_such_proj"


def export_dir_is_a_file(w):
    blocker = write(w / "cases" / "adapter-file", "I am a file")

    def edit(c):
        callback(c, "LoRA")["init_args"]["export_dir"] = str(blocker)

    return ["fit", "--config", recipe(w, edit)], "adapter-file"


def unknown_quant_type(w):
    def edit(c):
        c["trainer"]["plugins"][0]["init_args"] = {"quant_type": "int3"}

    return ["fit", "--config", recipe(w, edit)], "int3"


def unsupported_blocksize(w):
    def edit(c):
        c["trainer"]["plugins"][0]["init_args"] = {"blocksize": 100}

    return ["fit", "--config", recipe(w, edit)], "blocksize=100"


def unknown_compute_dtype(w):
    def edit(c):
        c["trainer"]["plugins"][0]["init_args"] = {"compute_dtype": "float7"}

    return ["fit", "--config", recipe(w, edit)], "float7"


def unknown_optimizer(w):
    def edit(c):
        c["trainer"]["strategy"]["init_args"] = {"optimizer": "paged_adamw_3bit"}

    return ["fit", "--config", recipe(w, edit)], "paged_adamw_3bit"


def data_file_missing(w):
    return ["fit", "--config", recipe(w), f"--data.init_args.path={w / 'cases' / 'none.jsonl'}"], "none.jsonl"


def data_file_empty(w):
    return ["fit", "--config", recipe(w), f"--data.init_args.path={write(w / 'cases' / 'empty.jsonl', '')}"], (
        "empty.jsonl"
    )


def data_broken_json_row(w):
    lines = (w / "rows.jsonl").read_text().splitlines()
    lines[4] = '{"instruction": "cut off'
    path = write(w / "cases" / "broken-row.jsonl", "\n".join(lines) + "\n")
    return ["fit", "--config", recipe(w), f"--data.init_args.path={path}"], "broken-row.jsonl line 5"


def data_row_missing_output(w):
    lines = (w / "rows.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"instruction": "no answer", "input": ""})
    path = write(w / "cases" / "no-output.jsonl", "\n".join(lines) + "\n")
    return ["fit", "--config", recipe(w), f"--data.init_args.path={path}"], "no-output.jsonl line 3"


def data_row_wrong_type(w):
    lines = (w / "rows.jsonl").read_text().splitlines()
    lines[6] = json.dumps({"instruction": ["a", "list"], "input": "", "output": "x"})
    path = write(w / "cases" / "wrong-type.jsonl", "\n".join(lines) + "\n")
    return ["fit", "--config", recipe(w), f"--data.init_args.path={path}"], "wrong-type.jsonl line 7"


def data_row_with_a_mistyped_role(w):
    rows = [[{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}] for i in range(16)]
    rows[2][0]["role"] = "usr"
    path = write(w / "cases" / "role.jsonl", "".join(json.dumps({"messages": r}) + "\n" for r in rows))
    args = ["fit", "--config", recipe(w), f"--data.init_args.path={path}"]
    return args, "role.jsonl line 3: messages[0] has role 'usr'"


def data_json_not_a_list(w):
    path = write(w / "cases" / "object.json", json.dumps({"instruction": "a", "output": "b"}))
    return ["fit", "--config", recipe(w), f"--data.init_args.path={path}"], "object.json"


def data_val_split_too_large(w):
    return ["fit", "--config", recipe(w), "--data.init_args.val_split=50"], "rows.jsonl"


def data_unknown_format(w):
    return ["fit", "--config", recipe(w), "--data.init_args.format=csv"], "csv"


def model_dir_missing(w):
    return ["fit", "--config", recipe(w), f"--model.init_args.model={w / 'cases' / 'no-model'}"], "no-model"


def model_dir_without_config(w):
    model = copy_model(w, "no-config")
    (model / "config.json").unlink()
    return ["fit", "--config", recipe(w), f"--model.init_args.model={model}"], "no-config"


def model_config_not_json(w):
    model = copy_model(w, "bad-config")
    (model / "config.json").write_text("{not json")
    return ["fit", "--config", recipe(w), f"--model.init_args.model={model}"], "bad-config"


def truncated_safetensors(w):
    model = copy_model(w, "truncated")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["fit", "--config", recipe(w), f"--model.init_args.model={model}"], "model.safetensors"


def safetensors_with_wrong_shapes(w):
    model = copy_model(w, "wrong-shapes")
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 64, tensors[key].shape[1])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return ["fit", "--config", recipe(w), f"--model.init_args.model={model}"], "q_proj"


def gguf_truncated(w):
    import gguf

    whole = w / "cases" / "whole.gguf"
    whole.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(whole), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", torch.zeros(32, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = write(w / "cases" / "cut.gguf", whole.read_bytes()[:-3000])  # the tensor data is cut off
    must_name = "cut.gguf cannot be converted: it is truncated"
    return ["fit", "--config", recipe(w), f"--model.init_args.model={path}"], must_name


def model_dir_with_config_only(w):
    model = w / "cases" / "config-only"
    model.mkdir(parents=True, exist_ok=True)
    shutil.copy2(w / "model" / "config.json", model / "config.json")
    return ["fit", "--config", recipe(w), f"--model.init_args.model={model}"], f"model folder {model} has no weights"


def data_path_is_a_folder_with_a_bad_file(w):
    folder = w / "cases" / "data-folder"
    shutil.copy2(w / "rows.jsonl", write(folder / "a.jsonl", ""))
    write(folder / "b.jsonl", json.dumps({"instruction": 123, "input": "", "output": "x"}) + "\n")
    return ["fit", "--config", recipe(w), f"--data.init_args.path={folder}"], "b.jsonl line 1"


def data_path_is_a_folder_of_csv(w):
    folder = w / "cases" / "csv-folder"
    write(folder / "rows.csv", "instruction,output\nRepeat 1.,1 1.\n")
    return ["fit", "--config", recipe(w), f"--data.init_args.path={folder}"], "rows.csv, an unsupported file type"


def gguf_that_is_not_gguf(w):
    path = write(w / "cases" / "fake.gguf", b"not a gguf file at all")
    return ["fit", "--config", recipe(w), f"--model.init_args.model={path}"], "fake.gguf"


def evaluate_adapter_missing(w):
    return ["evaluate", "--config", recipe(w), "--tasks=[qlora_demo_mc]", f"--adapter={w / 'no-adapter'}"], (
        "no-adapter"
    )


def evaluate_adapter_wrong_shapes(w):
    adapter = w / "cases" / "adapter-wrong-shapes"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(w / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 64)
    save_file(tensors, adapter / "adapter_model.safetensors")
    return ["evaluate", "--config", recipe(w), "--tasks=[qlora_demo_mc]", f"--adapter={adapter}"], (
        "adapter-wrong-shapes"
    )


def evaluate_adapter_config_broken(w):
    adapter = w / "cases" / "adapter-bad-config"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(w / "adapter", adapter)
    (adapter / "adapter_config.json").write_text('{"r": 8,')
    return ["evaluate", "--config", recipe(w), "--tasks=[qlora_demo_mc]", f"--adapter={adapter}"], "adapter_config"


def evaluate_unknown_task(w):
    return ["evaluate", "--config", recipe(w), "--tasks=[mmlu_klingon]"], "mmlu_klingon"


def evaluate_mmlu_path_missing(w):
    return ["evaluate", "--config", recipe(w), "--tasks=[mmlu]", f"--mmlu_path={w / 'no-mmlu'}"], "no-mmlu"


def checkpoint_missing(w):
    return ["fit", "--config", recipe(w), f"--ckpt_path={w / 'ckpts' / 'nope.ckpt'}"], "nope.ckpt"


def checkpoint_truncated(w):
    data = (w / "ckpts" / "last.ckpt").read_bytes()
    path = write(w / "cases" / "truncated.ckpt", data[: len(data) // 3])
    return ["fit", "--config", recipe(w), f"--ckpt_path={path}"], "truncated.ckpt"


def checkpoint_path_is_a_folder(w):
    return ["fit", "--config", recipe(w), f"--ckpt_path={w / 'ckpts'}"], "is a folder, not a checkpoint file"


def checkpoint_path_is_an_adapter_file(w):
    path = w / "adapter" / "adapter_model.safetensors"
    return ["fit", "--config", recipe(w), f"--ckpt_path={path}"], "adapter_model.safetensors is a safetensors file"


def resume_last_after_a_cut_off_first_save(w):
    folder = w / "cases" / "cut-off-ckpts"
    shutil.rmtree(folder, ignore_errors=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = write(folder / f".last.ckpt.tmp-{gone.stdout.strip()}-x1y2", b"PK\x03\x04 half a checkpoint")

    def edit(c):
        elsewhere(w, "cut-off")(c)
        callback(c, "ResumableCheckpoint")["init_args"]["dirpath"] = str(folder)

    CLEANED.append(partial)
    return ["fit", "--config", recipe(w, edit), "--ckpt_path=last"], "the only save there was cut off by a killed run"


def accumulate_grad_batches_zero(w):
    return ["fit", "--config", recipe(w), "--trainer.accumulate_grad_batches=0"], "accumulate_grad_batches=0"


def checkpoint_not_a_checkpoint(w):
    path = write(w / "cases" / "notes.ckpt", "these are my notes")
    return ["fit", "--config", recipe(w), f"--ckpt_path={path}"], "notes.ckpt"


def checkpoint_with_pickled_code(w):
    path = w / "cases" / "pickled.ckpt"
    torch.save({"state_dict": {}, "payload": Path("/etc/passwd")}, path)
    return ["fit", "--config", recipe(w), f"--ckpt_path={path}"], "pickled.ckpt"


def checkpoint_on_a_copy(w, name: str) -> tuple[Path, Path]:
    """Train 1 step on a copy of the base in cases/<name>-base; returns the copy and its last.ckpt."""
    base = copy_model(w, f"{name}-base")

    def elsewhere(c):
        callback(c, "LoRA")["init_args"]["export_dir"] = str(w / "cases" / f"{name}-adapter")
        callback(c, "ResumableCheckpoint")["init_args"]["dirpath"] = str(w / "cases" / f"{name}-ckpts")
        c["trainer"]["default_root_dir"] = str(w / "cases" / f"{name}-run")
        c["model"]["init_args"]["model"] = str(base)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lightning-qlora"])
        main(["fit", "--config", recipe(w, elsewhere), "--trainer.max_steps=1"])
    return base, w / "cases" / f"{name}-ckpts" / "last.ckpt"


def on(base):
    """A recipe edit: train ``base``."""

    def edit(c):
        c["model"]["init_args"]["model"] = str(base)

    return edit


def checkpoint_from_another_base(w):
    # the same path, other weights there now (the config names the model; a checkpoint path does not replace it)
    base, ckpt = checkpoint_on_a_copy(w, "replaced")
    build_tiny_llama(seed=1).save_pretrained(base)
    return ["fit", "--config", recipe(w, on(base)), f"--ckpt_path={ckpt}"], "base model"


def checkpoint_from_a_merged_base(w):
    # same embeddings and norms, other linear weights (as after merging another adapter): told apart by 4-bit codes
    base, ckpt = checkpoint_on_a_copy(w, "merged")
    tensors = load_file(base / "model.safetensors")
    for key in [k for k in tensors if k.endswith("q_proj.weight")]:
        tensors[key] = tensors[key] + 0.05 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return ["fit", "--config", recipe(w, on(base)), f"--ckpt_path={ckpt}"], "other 4-bit weights"


def checkpoint_with_other_lora_rank(w):
    def edit(c):
        callback(c, "LoRA")["init_args"]["r"] = 16

    # max_steps above the checkpoint's step: resuming a finished run is refused before the checkpoint is read
    return ["fit", "--config", recipe(w, edit), f"--ckpt_path={w / 'ckpts' / 'last.ckpt'}", "--trainer.max_steps=3"], (
        "r=8"
    )


def resume_with_other_quantization(w):
    def edit(c):
        c["trainer"]["plugins"][0]["init_args"] = {"double_quant": False}

    return ["fit", "--config", recipe(w, edit), f"--ckpt_path={w / 'ckpts' / 'last.ckpt'}", "--trainer.max_steps=3"], (
        "double_quant"
    )


def zero_steps_over_an_existing_adapter(w):
    return ["fit", "--config", recipe(w), "--trainer.max_steps=0"], (
        f"{w / 'adapter'} with an untrained one; pass --overwrite true"
    )


def resume_of_a_finished_run_over_its_adapter(w):
    return ["fit", "--config", recipe(w), "--ckpt_path=last"], "already at step 2 (max_steps=2)"


def run_dir_held_by_a_live_run(w):
    proc = hold_run_lock(w / "run", w / "cases" / "logs")
    HOLDERS.append(proc)
    return ["fit", "--config", recipe(w)], f"{w / 'run'} is in use by another run (pid {proc.pid} on"


def export_dir_held_by_a_live_run(w):
    # another default_root_dir, the same LoRA export_dir (the recipe's own path): the adapter is another run's
    proc = hold_run_lock(w / "adapter", w / "cases" / "logs", beside=True)
    HOLDERS.append(proc)
    args = ["fit", "--config", recipe(w), f"--trainer.default_root_dir={w / 'cases' / 'other-run'}"]
    return args, f"{w / 'adapter'} is in use by another run (pid {proc.pid} on"


def default_root_dir_read_only(w):
    root = tmpfs(w, "ro-root", read_only=True) / "run"
    return ["fit", "--config", recipe(w), f"--trainer.default_root_dir={root}"], f"default_root_dir {root} is not"


def checkpoint_dirpath_read_only(w):
    folder = tmpfs(w, "ro-ckpts", read_only=True)

    def edit(c):
        callback(c, "ResumableCheckpoint")["init_args"]["dirpath"] = str(folder)

    return ["fit", "--config", recipe(w, edit)], f"checkpoint dirpath {folder} is not writable"


def export_dir_read_only(w):
    folder = tmpfs(w, "ro-adapter", read_only=True, holding=(w / "adapter",)) / "adapter"

    def edit(c):
        callback(c, "LoRA")["init_args"]["export_dir"] = str(folder)

    return ["fit", "--config", recipe(w, edit)], f"LoRA export_dir {folder} is not writable"


def disk_full_at_checkpoint_save(w):
    last = w / "ckpts" / "last.ckpt"  # an earlier checkpoint fills the disk: the new one does not fit beside it
    folder = tmpfs(w, "full-ckpts", size=f"{last.stat().st_size // 1024 + 64}k", holding=(last,))

    def edit(c):
        elsewhere(w, "full-ckpts")(c)
        callback(c, "ResumableCheckpoint")["init_args"]["dirpath"] = str(folder)

    return ["fit", "--config", recipe(w, edit), "--trainer.max_steps=1"], f"cannot write {folder}/last", 1


def disk_full_at_adapter_export(w):
    size = sum(p.stat().st_size for p in (w / "adapter").iterdir()) // 1024 + 24
    folder = tmpfs(w, "full-adapter", size=f"{size}k", holding=(w / "adapter",)) / "adapter"

    def edit(c):
        elsewhere(w, "full-adapter")(c)
        callback(c, "LoRA")["init_args"]["export_dir"] = str(folder)

    needs = f"write {folder}: No space left on device (it needs"
    return ["fit", "--config", recipe(w, edit), "--trainer.max_steps=1"], needs, 1


CASES = [
    missing_config, yaml_syntax_error, unknown_trainer_key, wrong_type_for_max_steps, unknown_model_class,
    trainer_precision_beside_nf4,
    lora_rank_zero, lora_dropout_above_one, lora_targets_nothing, export_dir_is_a_file, unknown_quant_type,
    unsupported_blocksize, unknown_compute_dtype, unknown_optimizer, data_file_missing, data_file_empty,
    data_broken_json_row, data_row_missing_output, data_row_wrong_type, data_row_with_a_mistyped_role,
    data_json_not_a_list,
    data_val_split_too_large, data_unknown_format, model_dir_missing, model_dir_without_config,
    model_config_not_json, model_dir_with_config_only, truncated_safetensors, safetensors_with_wrong_shapes,
    gguf_that_is_not_gguf, gguf_truncated, data_path_is_a_folder_with_a_bad_file, data_path_is_a_folder_of_csv,
    checkpoint_path_is_a_folder, checkpoint_path_is_an_adapter_file, resume_last_after_a_cut_off_first_save,
    accumulate_grad_batches_zero,
    evaluate_adapter_missing, evaluate_adapter_wrong_shapes, evaluate_adapter_config_broken, evaluate_unknown_task,
    evaluate_mmlu_path_missing, checkpoint_missing, checkpoint_truncated, checkpoint_not_a_checkpoint,
    checkpoint_with_pickled_code, checkpoint_from_another_base, checkpoint_from_a_merged_base,
    checkpoint_with_other_lora_rank,
    resume_with_other_quantization, zero_steps_over_an_existing_adapter, resume_of_a_finished_run_over_its_adapter,
    run_dir_held_by_a_live_run, export_dir_held_by_a_live_run,
    default_root_dir_read_only, checkpoint_dirpath_read_only, export_dir_read_only,
    disk_full_at_checkpoint_save, disk_full_at_adapter_export,
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_bad_input_is_one_line_naming_it_and_overwrites_nothing(case, work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    args, must_name, *code = case(work)  # exit 2 for bad input, or the case's code (1: a fault while running)
    before = protected(work)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lightning-qlora: error:")]
    assert exit_.value.code == (code[0] if code else 2), err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert must_name in lines[0], lines[0]
    assert len(lines[0]) < 600
    assert protected(work) == before
    while CLEANED:
        assert not CLEANED.pop().exists(), "the partial file a killed save left is still there"
