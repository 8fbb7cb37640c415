"""Writes that never leave a half-written file or folder behind: temp + fsync + rename."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk; failures on folders are ignored."""
    if directory and os.name != "posix":
        return  # folders cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same file system: free, and the old directory keeps its own name for it
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: file system or kernel without exchange
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, owned: Callable[[str], bool]) -> Iterator[Path]:
    """Write a directory's files into a temporary sibling, then swap it into place.

    How: the body writes into ``.<name>.tmp-*`` next to ``directory`` (same file system; mode of the old folder, or
    the umask default). On success: entries of an existing ``directory`` that ``owned`` does not claim (a tokenizer,
    a README) are hard-linked in (copied across file systems); every file and folder is fsynced; the two folders are
    exchanged by one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), or where that is unavailable the old folder is
    renamed aside to ``.<name>.old-*`` and the new one renamed into place (a crash between those two renames leaves
    ``directory`` missing with both complete copies beside it); the parent is fsynced and the old copy deleted. If
    the body raises, the temporary folder is removed and ``directory`` is untouched.

    Args:
        directory: the folder to create or replace.
        owned: ``owned(name)`` is True for file names the body (re)writes; those are not carried over.

    Yields:
        The empty temporary folder to write into.

    Raises:
        ValueError: if ``directory`` exists and is not a folder.
    """
    target = Path(directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; pass a folder path to write into")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~umask)  # mkdtemp gives 0700
        yield tmp
        if target.is_dir():
            for entry in target.iterdir():
                if owned(entry.name) or (tmp / entry.name).exists():
                    continue
                if entry.is_symlink():
                    os.symlink(os.readlink(entry), tmp / entry.name)
                elif entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(entry), str(tmp / entry.name))
        for root, _, files in os.walk(tmp):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    fsync_path(Path(root, name))
            fsync_path(Path(root), directory=True)
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):  # tmp now holds the old copy when the exchange worked
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old)  # replaces the empty placeholder folder
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            tmp = old
        fsync_path(target.parent, directory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TEMP_MARK = ".tmp-"
"""Temp files are named ``.<name>.tmp-<pid>-<random>``: hidden, and never ending like the file they replace."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``; returns the path.

    A crash leaves either the old file or the new one, never a mix; on error the temp file is removed. The file
    gets the usual permissions (``0666`` minus the umask), not the temp file's ``0600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent, directory=True)  # make the rename itself durable
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
