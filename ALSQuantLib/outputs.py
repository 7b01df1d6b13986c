"""Output files and folders: written atomically, readable as the umask allows, checked before any computation,
locked while a run writes them, cleaned of what a killed run left.

* `atomic_path`: a temporary file beside the target, renamed onto it only when complete. A killed process never
  leaves a half-written output, only a hidden temporary (``.<name>.*.tmp*``), which `clean_temporaries` removes
  the next time the folder is locked.
* `prepare_folder` and `check_room`: the folder exists (or is made), is a folder, can be written, and has room
  before anything is computed into it.
* `locked`: one run at a time per folder (an advisory lock the operating system releases when the process dies, so
  a killed run never leaves a stale lock).
* File-system failures (no space, read-only, permission) become an `OutputError` naming the path.
"""

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError

LOCK_FILE = ".alsquant.lock"
MIN_FREE_BYTES = 16 << 20
"""A step that would compute into a folder with less free space than this is refused at once (16 MiB: a few maps
of a small grid; larger outputs that do not fit fail with "no space left on device: PATH")."""
_TEMPORARY_PATTERNS = (".*.tmp*", ".download-*", "alsquant-ants-*")
"""What killed runs leave: atomic writes' temporaries, downloads, ANTs work folders (`registration`)."""

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "it is a folder",
}


def os_error(err, path):
    """An `OutputError` for an `OSError` met while writing `path`: "no space left on device: PATH"."""
    reason = _REASONS.get(err.errno, err.strerror or str(err))
    path = path or err.filename
    return OutputError(f"{reason}: {path}" if path else reason)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the full suffix (``.nii.gz``) so that writers that choose a format by suffix work. The
    file gets the permissions the umask gives a new file (``mkstemp`` alone would make it private to its owner).
    A file-system failure (no space, read-only) is raised as `OutputError` naming `path`.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as err:
        raise os_error(err, path) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in _REASONS:  # not the file system's (a download's, for one): as it is
            raise
        raise os_error(err, path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def prepare_folder(folder, what="output folder"):
    """Make `folder` (and its parents) if needed and check that it is a folder this process may write in;
    `OutputError` naming it otherwise. Returns the folder as a Path. Needs no free space: a run whose results are all
    current must still work on a full disk."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{what} {folder}: cannot be made ({os_error(err, folder)})") from None
    if not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only file system, even for root
        reason = "read-only file system" if _read_only(folder) else "permission denied"
        raise OutputError(f"{what} {folder}: cannot be written ({reason})")
    return folder


def _read_only(folder):
    return bool(getattr(os, "statvfs", None) and os.statvfs(folder).f_flag & os.ST_RDONLY)


def check_room(folder):
    """Refuse to start computing into `folder` with less than `MIN_FREE_BYTES` free."""
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise OutputError(f"no space left on device: {folder} ({free / 2**20:.1f} MiB free)")


def clean_temporaries(folder):
    """Remove the hidden temporaries a killed run left in `folder` (call only while holding its lock)."""
    for pattern in _TEMPORARY_PATTERNS:
        for path in Path(folder).glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextlib.contextmanager
def locked(folder, what="output folder"):
    """Hold `folder`'s lock for the block, or refuse at once if another run holds it.

    The lock is the operating system's (``flock``; ``msvcrt.locking`` on Windows) on ``<folder>/.alsquant.lock``,
    released when the holder exits or dies. The lock file names the holder's process for the message.
    """
    folder = prepare_folder(folder, what)
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise os_error(err, path) from None
    try:
        if not _try_lock(fd):
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise OutputError(
                f"{what} {folder} is in use by another ALSQuant run ({holder}); wait for it to finish, or choose "
                "another folder"
            )
        with contextlib.suppress(OSError):  # only for the message of a run that finds the folder locked
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()}".encode())
        clean_temporaries(folder)
        yield folder
    finally:
        os.close(fd)  # releases the lock (unbuffered: nothing left to write on a full disk)


def _try_lock(fd):
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
    except BlockingIOError:
        return False
    return True
