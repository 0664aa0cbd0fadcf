"""Where export builds a bundle, how it puts it in place, and what a killed export leaves.

Export builds a bundle in a staging folder beside ``--out`` (``.{name}.partial-{pid}-XXXXXXXX``)
and moves it into place whole, so a failed export leaves neither a half-written bundle nor a
damaged old one. Two things can still leave debris, and this module handles both:

* **A killed export** (SIGKILL, the kernel's OOM killer, a lost node) cannot remove its staging
  folder. Every staging folder is therefore locked (``flock``, exclusive, on the folder itself)
  by the export that owns it for as long as it runs; the kernel drops the lock when that
  process dies, so "unlocked" means "dead" exactly, even after its pid is reused. The next
  export to the same ``--out`` (:func:`clean_stale`, which :func:`staged` calls) removes the
  unlocked ones and never a locked one. The lock is on the folder and not on a file in it,
  because every file in the staging folder becomes a file of the bundle (and of its manifest).
  Folders left by versions before the lock carry none: they count as stale at once. A running
  export of such a version writing to the same ``--out`` as a new one would lose its folder
  and fail loudly (it cannot write a bundle from a missing folder); that mix is not supported.
* **The replacement of an existing bundle.** On Linux :func:`move_into_place` swaps the new
  bundle and the old one in one ``renameat2(RENAME_EXCHANGE)``: ``--out`` always holds a
  complete bundle, and a crash after the swap only leaves the old bundle in an unlocked
  staging folder. Where the swap is unavailable (another system, a file system without it)
  it takes two renames: ``--out`` into a locked ``.{name}.old-{pid}-XXXXXXXX/{name}``, then the
  new bundle to ``--out``. An export killed between them leaves no ``--out``:
  :func:`clean_stale` then puts the old bundle back (the newest one, when several) before it
  removes the rest, so ``--out`` is never lost, only its replacement.

Where the file system has no locks, staging folders go unlocked and unremoved, as before.
The owner of a staging folder is named in it (its pid) and shown by ``fuser -v FOLDER``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["clean_stale", "move_into_place", "staged"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# renameat2's answers where the system or the file system cannot swap: fall back to two renames.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new staging folder beside ``out``, locked by this process until the block ends.

    Removes what killed exports to ``out`` left first (:func:`clean_stale`). The block is
    expected to end with :func:`move_into_place`; if it raises, the folder is removed.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    staging, lock = _create_locked(out, "partial")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _unlock(lock)


def clean_stale(out: Path) -> list[Path]:
    """Remove the staging and old folders of ``out`` that no live process holds; the removed.

    When ``out`` is missing and an old folder holds a bundle, an export died between its two
    renames: the newest such bundle goes back to ``out`` before its folder is removed.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(?:\d+-)?[a-z0-9_]{{8}}")
    try:
        entries = list(os.scandir(out.parent))
    except FileNotFoundError:
        return []
    found = [
        (entry, match.group(1))
        for entry in entries
        if (match := pattern.fullmatch(entry.name)) and entry.is_dir(follow_symlinks=False)
    ]
    # Old folders first, the newest first: the one that goes back is the last bundle moved.
    found.sort(key=lambda item: (item[1] != "old", -_mtime(item[0])))
    removed = []
    for entry, kind in found:
        path = Path(entry.path)
        try:
            lock = _lock(path)
        except OSError:  # no locks here: we cannot tell whether it is alive, so it stays
            continue
        if lock is None:  # alive (or already gone)
            continue
        try:
            bundle = path / out.name
            if kind == "old" and not os.path.lexists(out) and os.path.lexists(bundle):
                with suppress(OSError):  # another export put a bundle there since: keep it
                    bundle.rename(out)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            _unlock(lock)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def move_into_place(staging: Path, out: Path) -> None:
    """Put the finished bundle ``staging`` at ``out``, replacing whatever is there.

    Call it inside :func:`staged`, whose lock keeps the folder from other exports' cleaning.
    """
    if not os.path.lexists(out):
        staging.rename(out)
    elif _exchange(staging, out):
        _remove(staging)  # the previous bundle now
    else:
        _replace(staging, out)


def _replace(staging: Path, out: Path) -> None:
    """Two renames, through a locked old folder that clean_stale recovers from if we die."""
    old, lock = _create_locked(out, "old")
    try:
        out.rename(old / out.name)
        try:
            staging.rename(out)
        except BaseException:
            with suppress(OSError):
                (old / out.name).rename(out)  # the previous bundle goes back
            raise
    finally:
        if os.path.lexists(out):  # else the old folder holds the only bundle: clean_stale's
            shutil.rmtree(old, ignore_errors=True)
        _unlock(lock)


def _create_locked(out: Path, kind: str) -> tuple[Path, int | None]:
    """A new folder ``.{name}.{kind}-{pid}-XXXXXXXX`` beside ``out`` and this process's lock
    on it (None where the file system has no locks)."""
    while True:
        prefix = f".{out.name}.{kind}-{os.getpid()}-"
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        try:
            lock = _lock(path)
        except OSError:
            return path, None
        if lock is not None:
            return path, lock
        # Another export's clean_stale saw the folder before we locked it and removes it.


def _lock(path: Path) -> int | None:
    """The folder's descriptor holding its exclusive lock, taken without waiting; None when
    another process holds the lock or the folder is gone. OSError where there are no locks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    # Between open and lock, a process that held the lock may have removed the folder.
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        same = False
    if same:
        return fd
    os.close(fd)
    return None


def _unlock(lock: int | None) -> None:
    if lock is not None:
        os.close(lock)  # closing the last descriptor drops the lock


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    function: Callable[..., int] | None = getattr(
        ctypes.CDLL(None, use_errno=True), "renameat2", None
    )
    return function


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()
