"""One run per ``out_dir``: a lock file taken by rank 0 before the run writes anything.

``<out_dir>/mom_train.lock`` is a ``mom_dist.file_lock`` lock (holder named, atomic ``O_EXCL``
creation, stale locks taken over, the same code ``mom-preprocess`` locks its prefix with): of
two runs started on the same ``out_dir`` exactly one gets it; the other stops at start with a
message naming the holder.

Every rank must write into the same directory: rank 0 broadcasts the lock's random token and
each rank reads it back from its own view of ``out_dir``. A rank that does not see it (a
node-local path on a multi-node job) makes every rank stop with an error naming the hosts.
The lock is released (file removed; ``out_dir`` too if this run created it and left it empty)
on every exit path through ``release()`` - the trainer calls it in a ``finally``. A run killed
with SIGKILL leaves the file behind; the next run on that host finds it stale.
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist

from mom_dist.file_lock import file_token, release_lock, take_lock

LOCK_NAME = "mom_train.lock"


def _take(out_dir: str, path: str, log) -> dict:
    """Create the lock file or raise ValueError naming its holder."""
    return take_lock(path, log, f"train.out_dir '{out_dir}'", "mom-train",
                     "wait for it to finish, stop it, or use another train.out_dir")


class RunLock:
    def __init__(self, out_dir: str, rank: int):
        self.out_dir, self.path, self.rank = out_dir, os.path.join(out_dir, LOCK_NAME), rank
        self.token: str | None = None
        self.created_dir = False

    @classmethod
    def acquire(cls, out_dir: str, rank: int, log=print) -> "RunLock":
        """Rank 0 takes the lock; every rank learns the verdict and checks it sees the file."""
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
        return file_token(self.path)

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
