"""Exit codes every mom_dist command and launcher agrees on, and the exceptions that carry them.

    0   finished           the run did everything it was asked: train.steps done (``done`` line,
                           printed once, by rank 0) or train.stop_after reached (a ``stopped at``
                           line naming the checkpoint)
    1   failed             an unexpected error (a traceback was printed), or an environment failure
                           that is not the input's fault, such as a full disk (one line, no traceback)
    2   bad input          config, data, checkpoint, launcher environment or usage: a one-line message
    3   diverged           non-finite loss/gradients for train.max_nonfinite_steps consecutive steps;
                           the newest finite checkpoint is left as ``latest``
    4   collective timeout a rank stopped answering inside a collective (parallel.collective_timeout_s)
    75  preempted          a preemption signal (SIGUSR1/SIGTERM) arrived; state is saved (or no
                           checkpoint existed yet): requeue the job and it resumes / starts over
                           (75 = EX_TEMPFAIL, "try again later")

The SLURM launchers map 75 to a requeue (up to MAX_RESTARTS; past it the job ends 75 naming the
checkpoint); everything else ends the job with that code. Rank 0 also writes ``<code> <checkpoint>``
to MOM_DIST_EXIT_FILE when set (torchrun's own exit status hides its ranks' codes).
"""

from __future__ import annotations

import errno

FINISHED = 0
FAILED = 1
BAD_INPUT = 2
DIVERGED = 3
COLLECTIVE_TIMEOUT = 4
PREEMPTED = 75


class TrainingDiverged(RuntimeError):
    """Raised by the trainer after too many consecutive non-finite steps (exit code DIVERGED)."""


class DiskFull(OSError):
    """The disk filled while a checkpoint was written (exit code FAILED, reported in one line)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror
