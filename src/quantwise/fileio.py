"""Atomic writes (bad-inputs 20; issue 17, crash safety).

Files: a temporary file in the same folder, then os.replace. Folders: written into a staging
folder beside the output, then swapped in with one atomic rename exchange (Linux renameat2), so a
reader, or a process killed at any point, sees the old output or the new one whole, never half.
A writer holds an exclusive lock on the output (`.NAME.qw-lock` beside it, flock: the kernel
drops it when the process dies), so a second writer fails clearly instead of racing. Staging
folders are named `.NAME.qw-staging-PID-RANDOM`: what a killed writer leaves is removed by the
next writer of NAME (it holds the lock, and PID is dead), nothing else is ever touched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantwise.errors import OutputPathError


_written: list[Path] = []  # user outputs finished in this process (record_output), in order


def record_output(path: str | Path) -> None:
    """Note that `path` (a file or folder the user asked for) is now complete on disk, so an
    interruption later can say what it left (cli/)."""
    _written.append(Path(path))


def outputs_mark() -> int:
    return len(_written)


def outputs_since(mark: int) -> list[Path]:
    return list(dict.fromkeys(_written[mark:]))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_failure(exc: BaseException, target: str | Path) -> OutputPathError:
    """A clear error for a failed write (OSError, or safetensors' SafetensorError, which carries
    only the text "No space left on device (os error 28)"): why, whether the disk is full and
    where; the writers stage beside the output, so nothing was half-written."""
    target = Path(target)
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(exc)
    detail = getattr(exc, "strerror", None) or str(exc)
    where = f"; the disk under {target.parent} is full" if full else ""
    state = "its previous content is unchanged" if target.exists() else "nothing was written"
    return OutputPathError(f"writing {target} failed ({detail}){where}; {state}: free some space "
                           "or choose another output")


# -- the output lock -------------------------------------------------------------------------

_held: dict[str, list] = {}  # lock path -> [fd, depth, thread id]: re-entrant within a thread
_held_guard = threading.Lock()


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.qw-lock"


@contextmanager
def output_lock(target: str | Path) -> Iterator[None]:
    """Hold the exclusive lock on the output `target` (a folder or a file), or raise
    OutputPathError at once if another process (or thread) holds it. Taking it also removes
    what writers of `target` killed earlier left behind (_clean_stale)."""
    target = Path(target)
    key = str(_lock_path(target).resolve())
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[2] == threading.get_ident():
            entry[1] += 1
            nested = True
        elif entry is not None:
            raise _busy(target)
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    fd = _acquire(Path(key), target)
    with _held_guard:
        _held[key] = [fd, 1, threading.get_ident()]
    try:
        if fd is not None:
            _clean_stale(target)
        yield
    finally:
        with _held_guard:
            del _held[key]
        if fd is not None:  # removed while held: a waiting writer re-checks the inode (_acquire)
            Path(key).unlink(missing_ok=True)
            os.close(fd)


def _busy(target: Path) -> OutputPathError:
    return OutputPathError(f"another quantwise process is writing {target}: wait for it to "
                           "finish, or choose another output")


def _acquire(lock: Path, target: Path) -> int | None:
    lock.parent.mkdir(parents=True, exist_ok=True)  # as save does for its output
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(target) from None
        except OSError as exc:  # a file system without flock (ENOLCK, ...): write unlocked, as before
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder removed that file as we opened it: lock the current one


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clean_stale(target: Path) -> None:
    """Remove the staging folders (and their own nested staging) of dead writers of `target`.
    Safe: the caller holds the lock, only lock holders make such names, and their PID is dead.
    A backup of the old output (the two-rename fallback of swap_in) goes back into place when
    its writer died with `target` missing."""
    name = re.escape(target.name)
    own = re.compile(rf"\.{name}\.qw-(staging|old)-(\d+)-[a-z0-9_]+")
    nested = re.compile(rf"\.\.{name}\.qw-staging-(\d+)-[a-z0-9_]+\..+")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        match, pid = own.fullmatch(entry.name), None
        if match:
            pid = int(match.group(2))
        elif (inner := nested.fullmatch(entry.name)):
            pid = int(inner.group(1))
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        path = Path(entry.path)
        if match and match.group(1) == "old" and (path / "old").exists() and not target.exists():
            os.replace(path / "old", target)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def new_staging(target: str | Path, kind: str = "staging") -> Path:
    """An empty folder beside `target`, named for _clean_stale, with ordinary permissions."""
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.qw-{kind}-{os.getpid()}-",
                                    dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private
    return staging


@contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Write a folder atomically: hold its lock, yield an empty staging folder, swap it in when
    the block ends normally, remove it otherwise."""
    folder = Path(folder)
    with output_lock(folder):
        staging = new_staging(folder)
        try:
            yield staging
            swap_in(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# -- the swap --------------------------------------------------------------------------------

try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError):  # not glibc 2.28+ (macOS, musl): two renames
    _renameat2 = None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(staging: Path, folder: Path) -> None:
    """Replace `folder` by `staging` so that no reader, and no kill at any point, sees half of it
    or no folder at all (a checkpoint, an export). Holds `folder`'s lock while it swaps."""
    staging, folder = Path(staging), Path(folder)
    with output_lock(folder):
        if not folder.exists():
            os.replace(staging, folder)
            record_output(folder)
            return
        # a name _clean_stale knows: if we are killed below, the next writer removes the old copy
        marked = new_staging(folder)
        os.replace(staging, marked)
        if _exchange(marked, folder):
            record_output(folder)
            shutil.rmtree(marked, ignore_errors=True)  # now the old content
            return
        backup = new_staging(folder, "old")  # fallback: a kill between the renames leaves the
        os.replace(folder, backup / "old")   # old output here; the next writer puts it back
        try:
            os.replace(marked, folder)
            record_output(folder)
        except BaseException:
            os.replace(backup / "old", folder)
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)
            shutil.rmtree(marked, ignore_errors=True)
