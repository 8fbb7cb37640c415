"""Writes that never leave a half-written file or folder behind: temp + fsync + rename; full and unwritable disks."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lightning_qlora.utils.formatting import format_bytes

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
"""``errno`` values of a write that ran out of room: the device is full, or the user's disk quota is."""


class DiskFullError(OSError):
    """A write that ran out of space: one line naming the file (or folder), the bytes it needed and those free.

    Args:
        path: what was being written (None: not known; the free space is then not said either).
        needed: bytes the write needed, when known.
    """

    def __init__(self, path: str | os.PathLike | None, needed: int | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.needed = needed
        free = _free_bytes(self.path) if self.path is not None else None
        sizes = [f"it needs {needed:,} bytes ({format_bytes(needed)})"] if needed is not None else []
        sizes += [f"{free:,} bytes free there"] if free is not None else []
        where = f" ({', '.join(sizes)})" if sizes else ""
        what = self.path if self.path is not None else "a file (the writer did not say which)"
        message = f"cannot write {what}: No space left on device{where}; free some space or choose another folder"
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says the device or the disk quota is full.

    Also for libraries that wrap the ``OSError`` in their own exception (safetensors: ``... (os error 28)``).
    """
    seen: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and not any(link is s for s in seen) and len(seen) < 8:
        if isinstance(link, OSError) and link.errno is not None:
            if link.errno in NO_SPACE_ERRNOS:
                return True
        elif any(f"(os error {n})" in str(link) for n in NO_SPACE_ERRNOS) or "No space left on device" in str(link):
            return True
        seen.append(link)
        link = link.__cause__ or link.__context__
    return False


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            if folder.is_dir():
                return shutil.disk_usage(folder).free
    return None


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

    How: the body writes into ``.<name>.tmp-<pid>-*`` next to ``directory`` (same file system; mode of the old
    folder, or the umask default; such folders of a writer that was killed are removed first). On success: entries
    of an existing ``directory`` that ``owned`` does not claim (a tokenizer, a README) are hard-linked in (copied
    across file systems); every file and folder is fsynced; the two folders are exchanged by one atomic
    ``renameat2(RENAME_EXCHANGE)`` (Linux), or where that is unavailable the old folder is renamed aside to
    ``.<name>.old-*`` and the new one renamed into place (a crash between those two renames leaves ``directory``
    missing with both complete copies beside it); the parent is fsynced and the old copy deleted. If the body
    raises, the temporary folder is removed and ``directory`` is untouched; a full disk is then a
    :class:`DiskFullError` naming the file as ``directory`` would hold it (or ``directory``).

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
    _remove_stale_folders(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}{os.getpid()}-", dir=target.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~umask)  # mkdtemp gives 0700
        try:
            yield tmp
        except OSError as err:  # name the file as it will be called, on the device that is full
            if not is_disk_full(err) or isinstance(err, DiskFullError):
                raise
            written = Path(err.filename) if isinstance(err.filename, str) else None
            inside = written is not None and written.is_relative_to(tmp)
            raise DiskFullError(target / written.relative_to(tmp) if inside else target) from err  # type: ignore[union-attr]
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


def _remove_stale_folders(target: Path) -> None:
    """Delete the temporary and old copies beside ``target`` that a killed process left (``.<name>.tmp-<pid>-*``)."""
    for entry in target.parent.glob(f".{target.name}{TEMP_MARK}*-*"):
        pid = entry.name[len(f".{target.name}{TEMP_MARK}") :].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


TEMP_MARK = ".tmp-"
"""Temp files are named ``.<name>.tmp-<pid>-<random>``: hidden, and never ending like the file they replace."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``; returns the path.

    A crash leaves either the old file or the new one, never a mix; on error the temp file is removed. The file
    gets the usual permissions (``0666`` minus the umask), not the temp file's ``0600``.

    Args:
        path: the file to create or replace.
        data: its new content.

    Raises:
        DiskFullError: if the device (or the disk quota) is full; ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-")
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(path, len(data)) from err
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            raise DiskFullError(path, len(data)) from err
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


class OutputNotWritableError(ValueError):
    """An output folder cannot be created or written."""


def check_writable(folder: str | os.PathLike, what: str, probe: bool = True) -> Path:
    """Create ``folder`` (with its parents) and, with ``probe``, write and remove a temp file in it.

    Args:
        folder: the output folder.
        what: its name in the error (``"default_root_dir"``, ``"LoRA export_dir"``).
        probe: also write a temp file into it.

    Returns:
        The folder.

    Raises:
        OutputNotWritableError: naming ``folder``, if it is a file, or cannot be created or written.
    """
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputNotWritableError(f"{what} {path} exists and is not a directory; pass a folder path to write into")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if probe:
            fd, tmp = tempfile.mkstemp(dir=path, prefix=".lightning_qlora-probe-")
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        raise OutputNotWritableError(not_writable_message(path, what, err)) from None
    return path


def not_writable_message(path: Path, what: str, err: OSError) -> str:
    """``<what> <path> is not writable (<reason>); ...``: the one line for an output folder that refused a write."""
    reason = err.strerror or type(err).__name__
    return f"{what} {path} is not writable ({reason}); fix its permissions or choose another folder"
