"""One SLURM task of ``launchers/slurm_torchrun.sbatch``: torchrun, with every preemption signal
delivered to every rank whenever it comes.

    env --block-signal=USR1 --block-signal=TERM python mom_dist/parallel/torchrun_task.py \
        torchrun --nnodes ... -m mom_dist.cli.train ...

Why this exists: a cluster sends SIGUSR1 (time limit close) or SIGTERM (preemption) at any
moment. torchrun acts on them only once its agent has started the ranks; before that - the
interpreter start, imports, the c10d rendezvous across nodes (seconds) - Python's default kills
it (the job ends FAILED 138/143 and is never requeued). Blocking the signals in torchrun is not
enough either: a signal pending in torchrun never reaches ranks that do not exist yet. So:

- the batch script starts this file with both signals blocked; the handlers below only record
  them, and are installed before anything else (stdlib only, milliseconds);
- torchrun runs as our child with both signals blocked for its whole life (it never acts on
  them) and so do its ranks, until mom-train has armed its own handlers
  (``mom_dist.train.lifecycle.arm`` unblocks them; a signal pending since start-up fires then);
- every signal received here is sent to each rank - torchrun's children, the ones running now
  and the ones it starts later - once per rank and signal. The ranks agree on it at their next
  safe point, save (or, during set-up, leave with nothing to save) and exit 75; rank 0's exit
  record tells the batch script so (torchrun itself exits 1 whatever its ranks' codes).

SLURM may also signal the ranks directly (it signals every process of the step); a second copy
of the same signal changes nothing for mom-train. We exit with torchrun's status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: list[int] = []


def _record(signum, frame) -> None:
    if signum not in _received:
        os.write(2, f"torchrun_task: {signal.Signals(signum).name} received: passing it to every rank\n".encode())
        _received.append(signum)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc; torchrun's children are its ranks)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(name))
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print("torchrun_task: usage: torchrun_task.py TORCHRUN [ARGS...]", file=sys.stderr)
        return 2
    for sig in SIGNALS:
        signal.signal(sig, _record)
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # torchrun inherits the block (kept for good)
    try:
        proc = subprocess.Popen(argv)
    except OSError as e:
        print(f"torchrun_task: cannot start {argv[0]}: {e}", file=sys.stderr)
        return 2
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # ours: a signal pending since start-up is recorded now
    sent: set[tuple[int, int]] = set()
    while proc.poll() is None:
        for pid in children(proc.pid) if _received else ():
            for sig in _received:
                if (pid, sig) not in sent:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                    sent.add((pid, sig))
        time.sleep(0.2)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
