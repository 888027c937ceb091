"""One run per ``out_dir``: a lock file taken by rank 0 before the run writes anything.

``<out_dir>/mom_train.lock`` holds JSON ``{host, pid, pid_start, start, token}``. It is created
with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems), so of two runs started on
the same ``out_dir`` exactly one gets it; the other stops at start with a message naming the
holder. A lock whose holder is gone is *stale*: same host and the pid is no longer running (or
the pid now belongs to a younger process). A stale lock is taken over with a log line; a lock
held from another host cannot be checked from here, so it is reported with the command to
remove it by hand.

Every rank must write into the same directory: rank 0 broadcasts the lock's random token and
each rank reads it back from its own view of ``out_dir``. A rank that does not see it (a
node-local path on a multi-node job) makes every rank stop with an error naming the hosts.
The lock is released (file removed; ``out_dir`` too if this run created it and left it empty)
on every exit path through ``release()`` - the trainer calls it in a ``finally``. A run killed
with SIGKILL leaves the file behind; the next run on that host finds it stale.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

LOCK_NAME = "mom_train.lock"


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


def _take(out_dir: str, path: str, log) -> dict:
    """Create the lock file or raise ValueError naming its holder."""
    return take_lock(path, log, f"train.out_dir '{out_dir}'", "mom-train",
                     "wait for it to finish, stop it, or use another train.out_dir")


def take_lock(path: str, log, what: str, tool: str, fix: str) -> dict:
    """Create lock file ``path`` (module doc: atomic, stale locks taken over) and return its
    holder record, or raise ValueError "{what} is in use by another {tool} (host, pid, start);
    {fix} (if that run is gone, delete {path})". Also used by ``mom-preprocess`` for its prefix."""
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


def _file_token(path: str) -> str | None:
    try:
        with open(path) as f:
            return json.load(f).get("token")
    except (OSError, ValueError):
        return None


def release_lock(path: str, token: str) -> None:
    """Remove lock file ``path`` if it is still the one holding ``token`` (not a newer run's)."""
    if _file_token(path) == token:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class RunLock:
    def __init__(self, out_dir: str, rank: int):
        self.out_dir, self.path, self.rank = out_dir, os.path.join(out_dir, LOCK_NAME), rank
        self.token: str | None = None
        self.created_dir = False

    @classmethod
    def acquire(cls, out_dir: str, rank: int, log=print) -> "RunLock":
        """Rank 0 takes the lock; every rank learns the verdict and checks it sees the file."""
        import torch.distributed as dist  # here: mom-preprocess imports this module without torch

        lock = cls(out_dir, rank)
        verdict = [None, None]  # [error message, token]
        if rank == 0:
            try:
                lock.created_dir = not os.path.exists(out_dir)
                os.makedirs(out_dir, exist_ok=True)
                lock.token = _take(out_dir, lock.path, log)["token"]
                verdict = [None, lock.token]
            except ValueError as e:
                lock._remove_created_dir()
                verdict = [str(e), None]
            except OSError as e:  # out_dir is a file, under a file, on a read-only file system, ...
                lock._remove_created_dir()
                verdict = [f"train.out_dir '{out_dir}' cannot be used: {e.strerror or e} "
                           f"({e.filename or out_dir}); choose a directory path this rank can create and write", None]
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise ValueError(verdict[0])
        sees = rank == 0 or lock._file_token() == verdict[1]
        if distributed:
            views = [None] * dist.get_world_size()
            dist.all_gather_object(views, (rank, socket.gethostname(), sees))
            blind = [(r, h) for r, h, ok in views if not ok]
            if blind:
                lock.release()
                raise ValueError(
                    f"train.out_dir '{out_dir}' is not the same directory on every node: rank(s) "
                    f"{', '.join(f'{r} ({h})' for r, h in blind[:8])} do not see the lock file rank 0 wrote; "
                    "use a shared file system path for train.out_dir")
        return lock

    def _file_token(self) -> str | None:
        return _file_token(self.path)

    def _remove_created_dir(self) -> None:
        if self.created_dir:
            try:
                os.rmdir(self.out_dir)  # only if empty: a refused run leaves nothing behind
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if this process holds it (rank 0); safe to call more than once."""
        if self.rank != 0 or self.token is None:
            return
        release_lock(self.path, self.token)
        self.token = None
        self._remove_created_dir()
