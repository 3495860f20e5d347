"""One job per output folder: a lock file that names its holder.

    with FolderLock(out_dir, "train_vqvae.py"):
        ...                       # a second job on out_dir exits at once, naming this one
    FolderLock(out_dir).check()   # fail early when another job holds out_dir, without taking it

The lock is `<folder>/.lock`, holding the process id, the host, the command and the start time.
Where the OS has POSIX record locks (fcntl: Linux, macOS, also on NFS), holding the lock means
holding an exclusive record lock on that file: the kernel drops it when the process ends, even by
SIGKILL, so a lock left by a killed job is simply taken over, and the file only says who holds it.
Record locks are per process, not inherited by fork (DataLoader workers do not keep a folder
locked after their parent died) and released when the process closes ANY descriptor of the file,
so the holder never opens the file a second time. Elsewhere (Windows) the file is created with
O_EXCL and a lock whose process no longer runs on this host is taken over.

The file is removed on release; a job killed before that leaves it behind, harmlessly.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:                   # Windows: the O_EXCL scheme below
    fcntl = None

log = logging.getLogger("lock")

LOCK_NAME = ".lock"
BUSY_RETRY_S = 1.0                    # how long acquire retries a busy lock (covers check()'s brief probe)

_HELD: dict[str, "FolderLock"] = {}   # lock file -> its holder in this process (record locks are per process)


class LockError(ValueError):
    """Another job holds the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:           # exists, owned by someone else
        return True
    return True


def _describe(info: dict | None, path: Path) -> str:
    if not info:
        return f"another job (its lock file {path} is being written)"
    t = info.get("since")
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if isinstance(t, (int, float)) else "?"
    return f"{info.get('command', 'a job')} (process {info.get('pid')} on {info.get('host')}, since {since})"


class FolderLock:
    def __init__(self, folder, what: str = ""):
        self.folder, self.what = Path(folder), what or Path(sys.argv[0]).name
        self.path = self.folder / LOCK_NAME
        self.key = os.path.realpath(self.path)      # the same folder under any spelling
        self.held = False
        self.fd: int | None = None

    def holder(self) -> dict | None:
        """What the lock file says (pid, host, command, since), None when absent or unreadable.
        Another process may be writing it: read a few times before giving up."""
        for attempt in range(5):
            try:
                if self.fd is not None:      # reopening the file would drop our own record lock
                    text = os.pread(self.fd, 1 << 16, 0).decode()
                else:
                    text = self.path.read_text()
                return json.loads(text)
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                time.sleep(0.05 * (attempt + 1))
        return None

    def _busy(self) -> LockError:
        held = _HELD.get(self.key)
        who = f"{held.what} in this process" if held is not None else _describe(self.holder(), self.path)
        return LockError(f"{self.folder} is in use by {who}; wait for it to finish or pick another folder")

    def check(self) -> None:
        """Raise LockError when another job holds the folder; takes nothing. Where record locks
        exist this probes with a shared lock (probes never conflict with each other: every
        process of a torchrun job may check at once)."""
        if self.key in _HELD:
            raise self._busy()
        if fcntl is None:
            other = self.holder()
            if other and not self._stale(other):
                raise self._busy()
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise self._busy() from None
        finally:
            os.close(fd)                 # also drops the probe's shared lock

    def acquire(self) -> "FolderLock":
        if self.key in _HELD:
            raise self._busy()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.what, "since": time.time()}
        previous = self._acquire_record_lock() if fcntl is not None else self._acquire_exclusive_file(me)
        if previous and previous.get("pid") != me["pid"]:
            log.warning("%s: taking over the lock left by %s", self.folder, _describe(previous, self.path))
        if self.fd is not None:
            data = json.dumps(me).encode()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        self.held = True
        _HELD[self.key] = self
        return self

    def _acquire_record_lock(self) -> dict | None:
        """Lock the file (retrying a busy one for BUSY_RETRY_S); returns what it said before."""
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise self._busy() from None
                time.sleep(0.1)
                continue
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:                 # the previous holder removed the file as we opened it: lock the new one
                os.close(fd)
                continue
            self.fd = fd
            try:
                return json.loads(os.pread(fd, 1 << 16, 0).decode() or "null")
            except ValueError:
                return None

    def _stale(self, other: dict) -> bool:
        return other.get("host") == socket.gethostname() and isinstance(other.get("pid"), int) \
            and not _alive(other["pid"])

    def _acquire_exclusive_file(self, me: dict) -> dict | None:
        """Without record locks: create the file exclusively holding `me`, taking over the file
        of a process that no longer runs on this host; returns what that file said."""
        previous = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder()
                if other and self._stale(other):
                    previous = other
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy() from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return previous
        raise LockError(f"{self.folder}: could not take the lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.pop(self.key, None)
        if self.fd is not None:
            # remove the file while still holding it, so that nobody locks the removed file
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
            return
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
