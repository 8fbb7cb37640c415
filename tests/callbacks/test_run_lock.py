"""RunLock: one run per output folder (live holder refused, stale lock replaced), writable-folder checks, and a fit
that trains no step keeps the adapter and summary.json already there."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import Forked, TinyMLP, hold_run_lock
from torch.utils.data import DataLoader

from lightning_qlora import LoRA, RunLock, RunSummary
from lightning_qlora.callbacks.fit_outputs import resolve_resume_last
from lightning_qlora.callbacks.run_lock import (
    LOCK_NAME,
    OutputNotWritableError,
    RunDirLock,
    RunDirLockedError,
    check_writable,
)


def hold_lock_in_another_process(folder: Path) -> Forked:
    """A process that takes the folder's lock and sleeps; returns once the lock is held."""
    return hold_run_lock(folder, folder.parent / f"{folder.name}-logs")


def stop(proc: Forked) -> None:
    proc.kill()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_file_names_pid_and_host_and_goes_on_release(tmp_path):
    with RunDirLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert lock.path == tmp_path / "run" / LOCK_NAME
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with RunDirLock(tmp_path / "run"):  # re-entrant in one process (the CLI's lock plus a RunLock callback)
            pass
        assert lock.path.exists()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), RunDirLock(tmp_path):
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_run_in_another_process_is_refused_then_its_stale_lock_is_replaced(tmp_path, caplog):
    proc = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunDirLockedError) as err:
            RunDirLock(tmp_path).acquire()
        message = str(err.value)
        assert str(tmp_path) in message and f"pid {proc.pid}" in message and "--trainer.default_root_dir" in message
        assert "wait" in message and "\n" not in message
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # the holder's lock is untouched
    finally:
        stop(proc)  # killed: its lock stays behind, stale
    assert (tmp_path / LOCK_NAME).exists()
    with caplog.at_level(logging.INFO), RunDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and f"pid {proc.pid}" in stale[0], stale


@pytest.mark.parametrize("why", ["dead pid", "reused pid", "unreadable, old"])
def test_stale_locks_on_this_host_are_replaced(tmp_path, why):
    lock = tmp_path / LOCK_NAME
    if why == "unreadable, old":
        lock.write_text("")
        os.utime(lock, (0, 0))
    else:
        pid = dead_pid() if why == "dead pid" else os.getpid()  # our pid, but "started" at another time
        lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0, "pid_start": "-1"}))
    with RunDirLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_lock_from_another_host_is_refused_and_says_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunDirLockedError, match=rf"pid 1 on elsewhere.*delete {tmp_path / LOCK_NAME}"):
        RunDirLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ the callback in Trainer.fit
class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyMLP()
        self.locked: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.locked.append((Path(self.trainer.default_root_dir) / LOCK_NAME).exists())
        return torch.nn.functional.mse_loss(self.model(batch), batch)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def fit(root: Path, callbacks: list, steps: int, module: Regression | None = None) -> Regression:
    module = module or Regression()
    trainer = L.Trainer(
        default_root_dir=root, callbacks=callbacks, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, DataLoader(torch.randn(8, 64), batch_size=4))
    return module


def test_run_lock_callback_holds_the_folder_for_the_fit_and_refuses_a_held_one(tmp_path):
    module = fit(tmp_path, [RunLock()], steps=2)
    assert module.locked == [True, True] and not (tmp_path / LOCK_NAME).exists()
    proc = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunDirLockedError, match=f"pid {proc.pid}"):
            fit(tmp_path, [RunLock()], steps=1)
    finally:
        stop(proc)


def test_a_fit_without_steps_keeps_the_adapter_and_summary_a_trained_one_replaces_them(tmp_path, recwarn):
    def callbacks(overwrite: bool = False) -> list:
        lora, summary = LoRA(r=4, export_dir=str(tmp_path / "adapter")), RunSummary(progress_bar=False)
        if overwrite:
            lora.overwrite = summary.overwrite = True
        return [lora, summary]

    outputs = [tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "summary.json"]

    def snapshot() -> list[bytes]:
        return [p.read_bytes() for p in outputs]

    fit(tmp_path, callbacks(), steps=2)
    trained = snapshot()
    recwarn.clear()
    fit(tmp_path, callbacks(), steps=0)  # trains nothing: both files kept, one warning each
    assert snapshot() == trained
    kept = [str(w.message) for w in recwarn if "0 optimizer steps" in str(w.message)]
    assert len(kept) == 2 and "adapter" in kept[0] and "summary.json" in kept[1], kept
    fit(tmp_path, callbacks(overwrite=True), steps=0)  # asked to: replaced by the untrained export
    untrained = snapshot()
    assert untrained[0] != trained[0] and json.loads(untrained[1])["rows"]["steps"] == "0"
    fit(tmp_path, callbacks(), steps=2)  # a trained run into the same folders replaces them as before
    assert snapshot()[0] != untrained[0] and json.loads(outputs[1].read_text())["rows"]["steps"] == "2"


# ------------------------------------------------------------------------------------------ writable output folders
def test_check_writable_creates_the_folder_and_leaves_no_probe(tmp_path):
    assert check_writable(tmp_path / "a" / "b", "checkpoint dirpath").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotWritableError, match="default_root_dir .*file exists and is not a directory"):
        check_writable(tmp_path / "file", "default_root_dir")


@pytest.fixture()
def read_only_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot remount the tmpfs read-only")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_check_writable_names_a_read_only_folder(read_only_dir):
    with pytest.raises(OutputNotWritableError, match=f"LoRA export_dir {read_only_dir}/adapter is not writable"):
        check_writable(read_only_dir / "adapter", "LoRA export_dir")
    with pytest.raises(OutputNotWritableError, match=f"default_root_dir {read_only_dir} is not writable"):
        RunDirLock(read_only_dir).acquire()


def test_resume_last_finds_the_newest_complete_checkpoint_or_says_why_not(tmp_path, caplog):
    """`--ckpt_path last`: the newest last*.ckpt; none yet: start from step 0 (one line); a cut-off save: refused."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    with caplog.at_level(logging.INFO):
        assert resolve_resume_last([folder]) is None
    assert f"--ckpt_path last: no checkpoint in {folder} yet; starting from step 0" in caplog.text
    live = folder / f".last.ckpt.tmp-{os.getppid()}-abc"  # a save in progress in a live process is left alone
    live.write_bytes(b"PK")
    assert resolve_resume_last([folder]) is None and live.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cut = folder / f".last.ckpt.tmp-{gone.stdout.strip()}-def"
    cut.write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"the only save there was cut off by a killed run \(removed its partial"):
        resolve_resume_last([folder])
    assert not cut.exists() and live.exists()
    (folder / "last.ckpt").write_bytes(b"x")
    (folder / "last-v1.ckpt").write_bytes(b"y")
    os.utime(folder / "last.ckpt", (1, 1))
    assert resolve_resume_last([folder]) == str(folder / "last-v1.ckpt")


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / LOCK_NAME}: No space left on device"):
        RunDirLock(tmp_path).__enter__()
    monkeypatch.undo()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunDirLock(tmp_path):  # the next run is not refused by an empty lock
        pass
