"""Exit codes every mom_dist command and launcher agrees on, and the exceptions that carry them.

    0   finished           the run did everything it was asked (``done`` line printed once, rank 0)
    1   failed             an unexpected error (a traceback was printed)
    2   bad input          config, data, checkpoint, launcher environment or usage: a one-line message
    3   diverged           non-finite loss/gradients for train.max_nonfinite_steps consecutive steps;
                           the newest finite checkpoint is left as ``latest``
    4   collective timeout a rank stopped answering inside a collective (parallel.collective_timeout_s)
    75  preempted          a preemption signal (SIGUSR1/SIGTERM) arrived; state is saved (or no
                           checkpoint existed yet): requeue the job and it resumes / starts over
                           (75 = EX_TEMPFAIL, "try again later")

The SLURM launcher maps 75 to a requeue; everything else ends the job with that code.
"""

from __future__ import annotations

FINISHED = 0
FAILED = 1
BAD_INPUT = 2
DIVERGED = 3
COLLECTIVE_TIMEOUT = 4
PREEMPTED = 75


class TrainingDiverged(RuntimeError):
    """Raised by the trainer after too many consecutive non-finite steps (exit code DIVERGED)."""
