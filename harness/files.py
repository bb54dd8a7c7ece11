"""Files written safely: atomic writes (a reader sees the old file or the whole new one), advisory
locks, the writability probe and the errors a full or read-only disk becomes. The foundation
the results store, the data preparation and the caches write through."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from harness.digests import file_hash
from harness.errors import HarnessError


class StoreError(HarnessError, OSError):
    """The results store cannot be written (a full disk, no permission); the message names the path."""


class NoSpace(StoreError):
    """A write failed for lack of space (ENOSPC, EDQUOT): freeing some lets the same command go on."""


class NotWritable(StoreError):
    """A write failed for lack of permission (EACCES, EPERM), on a read-only file system (EROFS) or
    under a file (ENOTDIR): another place, or the permission, lets the same command go on."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path, nbytes=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextmanager
def atomic_output(path: str | Path, nbytes: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write in any way (a numpy memory map, ...); when the
    block ends without an exception the file is fsynced and renamed onto ``path`` (atomic on
    POSIX: readers see the old file or the whole new one); otherwise it is removed. The file's mode
    is what a plain ``open(path, "w")`` would give (0o666 less the umask). A full disk or
    a read-only directory becomes a :class:`StoreError` naming ``path`` (``nbytes``: what was
    being written, for the message). Temporaries are named ``.{name}.*.tmp``: a process killed
    midway leaves one, which the owner of the directory may delete."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it owner-only; a plain write honours the umask
    except OSError as e:
        raise store_error(path, nbytes, e) from None
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise store_error(path, nbytes, e) from None
        raise


def current_umask() -> int:
    """This process's umask: from /proc (Linux; reading it changes nothing), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def store_error(path: Path, nbytes: int | None, e: OSError) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        size = f"writing {nbytes:,} bytes" if nbytes is not None else "while writing"
        return NoSpace(f"{path}: no space left on the device ({size}); this file was not written (an earlier "
                          f"version, if any, is unchanged)")
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR):
        return NotWritable(f"{path}: cannot write here ({e.strerror})")
    return e


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive POSIX advisory lock on the file ``path`` (created), held for the block: one
    process at a time trains a run, builds a teacher's output cache..."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "w")
    except OSError as e:
        raise NotWritable(f"{path}: cannot write here ({e.strerror})") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def held_elsewhere(path: str | Path) -> bool:
    """Whether another process holds the :func:`locked` lock on ``path`` now (False if no such file)."""
    try:
        f = open(path, "a")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def check_writable(root: str | Path, what: str = "results directory", option: str = "--results") -> None:
    """Fail at once, naming ``root``, when nothing can be written there (read-only, not a
    directory, no permission), instead of a traceback from the first write midway."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NotWritable(f"{what} {root}: cannot write here ({e.strerror or e}); give a writable one "
                         f"({option} DIR)") from None


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n").encode())


def atomic_torch_save(path: str | Path, obj: Any) -> dict:
    """Save ``obj`` with torch.save, atomically; returns the size and SHA-1 of what was written
    (recorded with a run's weights, checked before they are used: :meth:`ResultsStore.usable`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return {"nbytes": len(data), "sha1": hashlib.sha1(data).hexdigest()}


def file_digest(path: str | Path) -> dict:
    """Size and SHA-1 of a file, as :func:`atomic_torch_save` returns them for what it wrote."""
    return {"nbytes": os.stat(path).st_size, "sha1": file_hash(path)}


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


