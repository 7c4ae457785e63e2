"""One job per run directory: the lock file ``DIR/.cka-split.lock``.

The file holds the owner's pid, host, process start time, command line and a random token (JSON).
It is created atomically and complete: the content is written to a temporary file that is then
hard-linked to the lock path, which fails if the path exists (``link(2)``, atomic on local file
systems and NFS alike; where hard links are not supported, ``open(O_CREAT | O_EXCL)``).

A lock is stale when its owner ran on this host and that process is gone (no such pid, or the pid
now belongs to a process that started at another time). A stale lock is taken over, and the caller
is told whose it was (:attr:`RunLock.stale`); a live owner, or one on another host (whose liveness
cannot be checked from here), makes :meth:`RunLock.acquire` raise a :class:`UserError` naming it.
The lock is released (its file deleted, if it is still ours) on exit from the ``with`` block,
exceptions and Ctrl-C included; a killed process leaves a stale lock that the next job takes over.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import ensure_writable_dir

LOCK_NAME = ".cka-split.lock"
_TAKE_ATTEMPTS = 3  # another job can create, release or break the lock between our steps; retry that often


@dataclass(frozen=True)
class LockOwner:
    """What a lock file says about the job that holds it."""

    pid: int
    host: str
    started: str
    command: str
    token: str
    proc_start: str | None = None  # the pid's start time in /proc (Linux), to tell a reused pid apart

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"

    def is_stale(self) -> bool:
        """True if the owner ran on this host and is no longer running."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, run by another user
            pass
        return self.proc_start is not None and _proc_start(self.pid) not in (None, self.proc_start)


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), if known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def _read(path: Path) -> LockOwner | None:
    """The owner recorded in ``path``; None if the file has gone; UserError if it is not a lock file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockOwner(
            **{k: data[k] for k in ("pid", "host", "started", "command", "token")}, proc_start=data.get("proc_start")
        )
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is not a readable cka-split lock file ({type(e).__name__}); if no job is using "
            f"{path.parent}, delete it"
        ) from None


class RunLock:
    """``with RunLock(folder): ...`` owns ``folder`` for the block (creating the folder if needed).

    ``stale`` is the dead owner whose lock was taken over, if any (for the caller to report)."""

    def __init__(self, folder: str | os.PathLike, command: str | None = None, what: str = "--out"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.owner = LockOwner(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            command=command or shlex.join(sys.argv),
            token=secrets.token_hex(8),
            proc_start=_proc_start(os.getpid()),
        )
        self.stale: LockOwner | None = None
        self.held = False
        self.created: list[Path] = []  # folders acquire() made: removed on release if still empty

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self.created = ensure_writable_dir(self.folder, self.what)
        for _ in range(_TAKE_ATTEMPTS):
            if self._create():
                self.held = True
                return
            owner = _read(self.path)
            if owner is None:  # released since we looked: try again
                continue
            if not owner.is_stale():
                self._remove_created()
                raise UserError(
                    f"{self.folder} is in use by {owner.describe()}; wait for that job to end or give "
                    f"another {self.what} (if it is not running, delete {self.path})"
                )
            if self._break(owner):
                self.stale = owner
        raise UserError(
            f"could not lock {self.folder}: other jobs keep taking and releasing {self.path}; "
            f"give each job its own {self.what}"
        )

    def _create(self) -> bool:
        """Create the lock file with our content if it does not exist; False if it does."""
        text = json.dumps(asdict(self.owner)) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", suffix=".tmp", dir=self.folder)
        except OSError as e:
            raise UserError(f"{self.what} {self.folder} is not writable ({e.strerror}); give another folder") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system: exclusive create instead
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                return True
        finally:
            os.unlink(tmp)

    def _break(self, owner: LockOwner) -> bool:
        """Remove the stale lock of ``owner``; False if the file changed hands meanwhile (left as found)."""
        moved = self.folder / f"{LOCK_NAME}.stale-{self.owner.token}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:  # another job broke it first
            return False
        taken = _read(moved)
        if taken is not None and taken.token != owner.token:  # a new owner's lock: put it back
            try:
                os.link(moved, self.path)
            except OSError:
                pass
            os.unlink(moved)
            return False
        os.unlink(moved)
        return True

    def took_over(self) -> str | None:
        """A note for the user when acquire() took over a dead job's lock (else None)."""
        if self.stale is None:
            return None
        return (
            f"note: {self.path} was left by {self.stale.describe()}, which is no longer running; this job took it over"
        )

    def release(self) -> None:
        """Delete the lock file if it is still ours, and the folders acquire() made if they stayed empty."""
        if not self.held:
            return
        self.held = False
        try:
            owner = _read(self.path)
        except UserError:
            return
        if owner is not None and owner.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
        self.created = []


def check_not_in_use(folder: str | os.PathLike, to_do: str) -> None:
    """Refuse to read ``folder`` while a live job owns it (for readers that need the job's finished
    output, not ownership: evaluating a training run); ``to_do`` ends the advice ("evaluate it")."""
    path = Path(folder) / LOCK_NAME
    owner = _read(path) if path.is_file() else None
    if owner is not None and not owner.is_stale():
        raise UserError(
            f"{Path(folder)} is in use by {owner.describe()}; {to_do} when that job has ended "
            f"(if it is not running, delete {path})"
        )
