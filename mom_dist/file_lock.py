"""A lock file that names its holder: one process at a time on a directory or an output prefix.

`take_lock(path, ...)` creates `path` with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+
file systems) holding JSON ``{host, pid, pid_start, start, token}``, so of two processes exactly
one gets it and the other gets a ValueError naming the holder (host, pid, start time). A lock
whose holder is gone is *stale*: same host and the pid no longer runs (or now belongs to a
younger process); it is taken over with a log line. A lock from another host cannot be checked
from here, so the message names the file to delete. `release_lock` removes it only if it still
holds this process's token. Used by `mom-train` for its out_dir (`run_lock.RunLock`, which
adds the all-ranks check) and by `mom-preprocess` for its output prefix.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time


def _pid_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, pid_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid: alive
        pass
    now = _pid_start(pid)
    return pid_start is None or now is None or now == pid_start


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('start')}"


def take_lock(path: str, log, what: str, tool: str, fix: str) -> dict:
    """Create lock file ``path`` (module doc) and return its holder record, or raise ValueError
    "{what} is in use by another {tool} (host, pid, start); {fix} (if that run is gone, delete
    {path})"."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
          "start": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": secrets.token_hex(8)}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                time.sleep(0.5)  # another run may be writing it right now; look again
                continue
            if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
                # Stale: its run died without releasing it. Rename first so that of two runs
                # taking it over at once only one removes it.
                aside = f"{path}.stale.{me['pid']}"
                try:
                    os.rename(path, aside)
                    os.remove(aside)
                    log(f"[mom_dist] removed the stale lock of a run that no longer exists ({_describe(holder)})")
                except FileNotFoundError:
                    pass
                continue
            raise ValueError(f"{what} is in use by another {tool} ({_describe(holder)}); {fix} (if that run "
                             f"is gone, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return me
    raise ValueError(f"could not take the lock '{path}' (unreadable or changing); if no run uses "
                     f"{what}, delete it")


def file_token(path: str) -> str | None:
    try:
        with open(path) as f:
            return json.load(f).get("token")
    except (OSError, ValueError):
        return None


def release_lock(path: str, token: str) -> None:
    """Remove lock file ``path`` if it is still the one holding ``token`` (not a newer run's)."""
    if file_token(path) == token:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
