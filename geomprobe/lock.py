"""One writer per output directory: a lock file that names its owner (docs/design.md §5, "Lock").

``DIR/geomprobe.lock`` holds one JSON line ``{"pid", "host", "started", "command"}`` of the process
that writes ``DIR``. It is held with ``flock`` on the open file, which the kernel releases when the
process ends, however it ends; so a lock file left by a killed process (SIGKILL, power loss) is
*stale* and the next writer takes it over, with a note naming the old owner. A live owner makes a
second writer fail at once with a one-line :class:`UsageError` naming its pid and host.

Where ``flock`` is not available (some network file systems) the owner's pid decides: a lock of a
pid that no longer runs on this host is stale; a lock of another host is never taken over.

Usage::

    with directory_lock(out, on_note=print):   # rank 0 only under torchrun
        ...  # write into out
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from geomprobe.errors import UsageError

LOCK_NAME = "geomprobe.lock"


def _owner_record() -> dict[str, Any]:
    """This process as a lock owner: pid, host name, start time (UTC, ISO) and command line."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
    }


def _read_owner(fd: int) -> dict[str, Any] | None:
    """The owner record in the open lock file, None when empty or unreadable (a half-written lock)."""
    try:
        raw = os.pread(fd, 1 << 16, 0)
        owner = json.loads(raw.decode())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    """True when a process ``pid`` runs on this host (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "an unknown process"
    since = f", since {owner['started']}" if owner.get("started") else ""
    return f"pid {owner['pid']} on {owner.get('host', '?')}{since}"


class DirectoryLock:
    """The lock file of one output directory (see the module docstring).

    Args:
        directory: the directory to own; created (with parents) when missing.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None
        self.created = False  # acquire() made the directory: release() removes it again if left empty

    def acquire(self) -> str | None:
        """Take the lock; returns a one-line note when a stale lock was taken over, else None.

        Raises:
            UsageError: another live process holds the lock (names its pid and host and the lock file),
                or ``directory`` exists and is not a directory.
        """
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"{self.directory} exists and is not a directory")
        self.created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # another process may remove the file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = self._lock_fd(fd)
            except BaseException:
                os.close(fd)
                raise
            if previous is not False:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(_owner_record()) + "\n").encode(), 0)
                if previous is None:
                    return None
                return f"took over the stale lock {self.path} of {_describe(previous)}, which no longer runs"
            os.close(fd)
        raise UsageError(f"cannot take the lock {self.path}: it keeps being replaced by another process")

    def _lock_fd(self, fd: int) -> dict[str, Any] | None | bool:
        """Lock ``fd`` with flock; the previous owner's record (None: none), or False when the file was replaced."""
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held_by_kernel = True
        except BlockingIOError:
            owner = _read_owner(fd)
            if owner is None:  # the owner has just created the file and is writing its record
                time.sleep(0.1)
                owner = _read_owner(fd)
            raise UsageError(self._busy_message(owner)) from None
        except (ImportError, OSError) as exc:  # no flock here (ENOLCK, EOPNOTSUPP): the pid decides
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            held_by_kernel = False
        try:
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                return False
        except FileNotFoundError:
            return False
        previous = _read_owner(fd)
        if previous is None:
            return None
        if not held_by_kernel and (previous.get("host") != socket.gethostname() or _pid_alive(previous["pid"])):
            raise UsageError(self._busy_message(previous))
        return previous

    def _busy_message(self, owner: dict[str, Any] | None) -> str:
        return (
            f"{self.directory} is being written by another geomprobe process ({_describe(owner)}); "
            f"wait for it to finish or stop it (lock file {self.path})"
        )

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and release the lock; a no-op when not held.

        A directory that :meth:`acquire` created and that is empty now is removed too.
        """
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None
        if self.created and not any(self.directory.iterdir()):  # a run that failed before writing anything
            self.directory.rmdir()

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(directory: str | Path) -> bool:
    """True when a live process holds ``directory``'s lock (readers then leave its files alone).

    A lock file that no process holds (a killed writer's) counts as unlocked. Where ``flock`` is not
    available the answer is False: readers behave as before locks existed.
    """
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except (ImportError, OSError):
        return False
    finally:
        os.close(fd)  # closing drops our shared lock too


def print_note(note: str) -> None:
    """A lock note (a stale lock taken over) as one line on stderr."""
    print(f"note: {note}", file=sys.stderr, flush=True)


@contextmanager
def directory_lock(
    directory: str | Path, enabled: bool = True, on_note: Callable[[str], None] | None = None, world: int = 1
) -> Iterator[DirectoryLock | None]:
    """Hold ``directory``'s lock for the block; released on any exit (error, Ctrl-C).

    Args:
        directory: the output directory.
        enabled: whether this process takes the lock (under torchrun: rank 0 only); False locks nothing.
        on_note: receives the one-line note when a stale lock was taken over.
        world: the torchrun world size; above 1 every rank learns whether rank 0 got the lock, so all
            fail together (no rank hangs waiting for another).

    Yields:
        The held :class:`DirectoryLock`, or None where ``enabled`` is False.

    Raises:
        UsageError: the directory is locked by a live process (on rank 0; the other ranks raise a
            DataError saying so).
    """
    lock = DirectoryLock(directory) if enabled else None
    acquire = lock.acquire if lock is not None else (lambda: None)
    if world > 1:
        from geomprobe.distributed import on_every_rank

        note = on_every_rank(world, acquire, f"{directory} is being written by another geomprobe process")
    else:
        note = acquire()
    if note and on_note:
        on_note(note)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
