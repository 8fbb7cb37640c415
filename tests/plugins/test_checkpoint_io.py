"""AtomicCheckpointIO: temp + fsync + rename writes, weights_only loads with one-line errors; atomic `last` links."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_qlora.callbacks.checkpoint import ResumableCheckpoint
from lightning_qlora.plugins.checkpoint_io import AtomicCheckpointIO, CheckpointLoadError, remove_stale_temp_files
from lightning_qlora.utils.atomic import TEMP_MARK


def test_round_trip_and_permissions_of_a_plain_file(tmp_path):
    io = AtomicCheckpointIO()
    state = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "global_step": 3, "dtype": torch.bfloat16}
    io.save_checkpoint(state, tmp_path / "sub" / "a.ckpt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "a.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"]) and loaded["global_step"] == 3
    assert loaded["dtype"] is torch.bfloat16
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "sub" / "a.ckpt").stat().st_mode) == 0o666 & ~mask
    assert not [p for p in (tmp_path / "sub").iterdir() if TEMP_MARK in p.name]


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="lambda|pickle|Can't"):
        io.save_checkpoint({"global_step": 2, "bad": lambda: 0}, path)  # serialisation fails first
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        io.save_checkpoint({"global_step": 3}, path)  # the rename fails: the temp file is cleaned up
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_stale_temp_files_from_killed_saves_are_removed_later(tmp_path):
    stale = tmp_path / f".last.ckpt{TEMP_MARK}123-abc"
    fresh = tmp_path / f".last.ckpt{TEMP_MARK}456-def"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in progress")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temp_files(tmp_path, 3600) == [stale]
    assert fresh.exists() and not stale.exists()


def test_load_errors_are_one_line_and_name_the_file(tmp_path):
    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(64, 64)}}, good)
    cases = {
        "truncated.ckpt": good.read_bytes()[:200],
        "text.ckpt": b"not a checkpoint",
        "empty.ckpt": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointLoadError, match=name) as err:
            io.load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)
    torch.save({"payload": Path("/etc")}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointLoadError, match=r"pickled.ckpt holds a pickled object .*weights_only=False"):
        io.load_checkpoint(tmp_path / "pickled.ckpt")
    assert AtomicCheckpointIO(weights_only=False).load_checkpoint(tmp_path / "pickled.ckpt")["payload"] == Path("/etc")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointLoadError, match="holds a list"):
        io.load_checkpoint(tmp_path / "list.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        io.load_checkpoint(tmp_path / "missing.ckpt")


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 64)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 64), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resumable_checkpoint_keeps_last_and_links_it_atomically(tmp_path):
    saver = ResumableCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_last="link", save_top_k=1)
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(_Tiny())
    last = tmp_path / "ckpts" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "epoch=0-step=3.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert not [p for p in (tmp_path / "ckpts").iterdir() if TEMP_MARK in p.name]
    assert ResumableCheckpoint().save_last is True and ResumableCheckpoint()._every_n_train_steps == 50


def test_usable_as_a_trainer_plugin_and_installed_in_one_place():
    import lightning as L
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lightning_qlora import PagedOptimizerStrategy
    from lightning_qlora.plugins.checkpoint_io import use_atomic_checkpoint_io

    mine = AtomicCheckpointIO(stale_after_s=60.0)
    trainer = L.Trainer(plugins=[mine], strategy=PagedOptimizerStrategy(), logger=False, enable_progress_bar=False)
    assert trainer.strategy.checkpoint_io is mine
    use_atomic_checkpoint_io(trainer)  # what LoRA.setup calls: a checkpoint IO the user chose is kept
    assert trainer.strategy.checkpoint_io is mine

    plain = L.Trainer(strategy=PagedOptimizerStrategy(), logger=False, enable_progress_bar=False)
    assert type(plain.strategy.checkpoint_io) is TorchCheckpointIO  # strategies install nothing themselves
    use_atomic_checkpoint_io(plain)
    assert type(plain.strategy.checkpoint_io) is AtomicCheckpointIO


def test_later_run_note_names_a_newer_last_checkpoint_beside_the_given_one(tmp_path):
    """A rerun into the same folder writes ``last-v1.ckpt`` (Lightning keeps the earlier ``last.ckpt``): commands given
    ``last.ckpt`` say that a later run's checkpoint is beside it; given the newest or another name: nothing."""
    from lightning_qlora.plugins.checkpoint_io import later_run_note

    first, second, other = tmp_path / "last.ckpt", tmp_path / "last-v1.ckpt", tmp_path / "step=5.ckpt"
    torch.save({"global_step": 40}, first)
    torch.save({"global_step": 40}, other)
    assert later_run_note(first) == ""
    torch.save({"global_step": 12}, second)
    os.utime(first, (1_000_000, 1_000_000))
    assert later_run_note(first) == f"; note: a later run wrote {second} (step 12), pass that file to use it"
    assert later_run_note(second) == "" and later_run_note(other) == ""
