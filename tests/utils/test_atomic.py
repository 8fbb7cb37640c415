"""atomic_directory and atomic_write_bytes: the exchange path, the fallback without renameat2, and crashes."""

import ctypes
import os

import pytest

from lightning_qlora.utils import atomic


class _LibcWithout:
    """A C library handle that has no ``renameat2`` (old glibc, musl, other kernels)."""

    def __getattr__(self, name):
        raise AttributeError(name)


def _write(directory, files):
    with atomic.atomic_directory(directory, owned=lambda n: n in files) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_without_renameat2_the_folder_is_replaced_by_rename_aside(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    _write(out, {"a.txt": "old"})
    (out / "keep.txt").write_text("user file")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: _LibcWithout())
    assert atomic._exchange(out, tmp_path) is False  # the lookup itself fails, not a faked _exchange
    _write(out, {"a.txt": "new"})
    assert (out / "a.txt").read_text() == "new" and (out / "keep.txt").read_text() == "user file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no .tmp- or .old- folder left


def test_renameat2_refused_by_the_file_system_falls_back(tmp_path, monkeypatch):
    class Refusing:
        def __init__(self):
            self.renameat2 = self

        def __call__(self, *args):
            ctypes.set_errno(95)  # EOPNOTSUPP
            return -1

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Refusing())
    monkeypatch.setattr(ctypes, "get_errno", lambda: 95)
    out = tmp_path / "adapter"
    _write(out, {"a.txt": "old"})
    _write(out, {"a.txt": "new"})
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_fallback_crash_between_the_two_renames_restores_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    _write(out, {"a.txt": "old"})
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.fspath(src):  # the new folder's move into place fails (disk error, kill)
            raise OSError(5, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        _write(out, {"a.txt": "new"})
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failing_body_leaves_the_folder_untouched(tmp_path):
    out = tmp_path / "adapter"
    _write(out, {"a.txt": "old"})
    with pytest.raises(RuntimeError), atomic.atomic_directory(out, owned=lambda n: True) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_write_bytes_replaces_whole_files_only(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic.atomic_write_bytes(path, b"first")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        atomic.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_full_disk_in_the_body_names_the_file_as_it_would_be_called(tmp_path):
    import errno

    out = tmp_path / "gguf"
    with pytest.raises(atomic.DiskFullError) as err, atomic.atomic_directory(out, owned=lambda n: True) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.gguf"))
    assert str(err.value).startswith(f"cannot write {out / 'model.gguf'}: No space left on device (")
    assert "bytes free there" in str(err.value)  # measured on the device that is full
    with pytest.raises(atomic.DiskFullError) as err, atomic.atomic_directory(out, owned=lambda n: True):
        raise OSError(errno.ENOSPC, "No space left on device")  # a writer that names no file: the folder
    assert str(err.value).startswith(f"cannot write {out}: No space left on device")
    unknown = str(atomic.DiskFullError(None))  # no file named: no free space of some other folder either
    assert unknown.startswith("cannot write a file (the writer did not say which): No space left on device;")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_folders_a_killed_writer_left_beside_the_target_are_removed(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".adapter.tmp-{proc.pid}-abc"  # a dead writer's
    live = tmp_path / f".adapter.tmp-{os.getpid()}-xyz"  # this process's (another writer still at work)
    other = tmp_path / f".other.tmp-{proc.pid}-abc"  # another target's
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_text("half")
    with atomic.atomic_directory(tmp_path / "adapter", owned=lambda n: True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", live.name, other.name])
