"""How a training process starts and ends: signals armed from the first second, ranks agreeing
on a preemption at safe points, and one line naming the rank when a rank fails.

    lifecycle.arm("mom-train")          # first thing in the console entry, before heavy imports
    ...
    lifecycle.safe_point(device, "engine set-up")   # set-up: raises PreemptedDuringSetup if agreed
    ...
    if lifecycle.preempt_agreed(device): save, leave  # each step boundary

Why this shape:
- A cluster sends SIGUSR1 (time limit close, ``--signal``) or SIGTERM (preemption, scancel) at any
  moment, also while torch/DeepSpeed import (seconds), the data index is built or a checkpoint
  loads. Python's default for both is "terminate" (SLURM reports FAILED 138 and never requeues),
  so the handlers are installed before anything slow and only *record* the signal. Launchers may
  start the process with the signals blocked (``env --block-signal=USR1,TERM``) so that not even
  the interpreter's start-up is a window; ``arm`` unblocks them once the handlers are in place,
  and a signal that came in meanwhile is delivered then.
- Ranks act on a signal together: any rank signalled -> every rank leaves (an all-reduce MAX at a
  safe point), because a rank that leaves alone leaves the others hanging in a collective.
- A failing rank writes one line ``mom-train: rank R/W on host H (pid P) failed: ...`` before it
  dies (exceptions, catchable fatal signals such as SIGHUP/SIGQUIT); crashes in C code (SIGSEGV,
  SIGABRT, ...) get Python's faulthandler traceback (which cannot carry the rank: the launcher's
  line does). SIGKILL cannot be caught: the launcher's line and the surviving ranks' "not
  answering" line (mom_dist.parallel.health) name that rank.

This module imports only the standard library at the top: ``arm`` must run within milliseconds of
the interpreter starting.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import traceback

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Signals whose default action ends the process and that we can still catch: write who died, then
# die the default way (so the launcher sees the real signal).
FATAL_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGXCPU)

_tool = "mom-train"
_received: list[str] = []  # names of preemption signals received, in order
_armed = False


class PreemptedDuringSetup(Exception):
    """Every rank agreed on a preemption signal before the first training step."""

    def __init__(self, where: str, signal_name: str, checkpoint: str | None):
        super().__init__(where)
        self.where, self.signal_name, self.checkpoint = where, signal_name, checkpoint


def identity() -> str:
    """``rank R/W on host H (pid P)`` from whatever the launcher set (no torch needed)."""
    env = os.environ
    rank = next((env[k] for k in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID") if k in env), "0")
    world = next((env[k] for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS") if k in env),
                 "1")  # no launcher variables: one process
    return f"rank {rank}/{world} on host {socket.gethostname()} (pid {os.getpid()})"


def _write(text: str) -> None:
    # os.write, not print: safe inside a signal handler that interrupted a print.
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


def _on_preempt(signum, frame) -> None:
    name = signal.Signals(signum).name
    if not _received:
        _write(f"{_tool}: {identity()}: {name} received: saving and leaving at the next safe point")
    _received.append(name)


def _on_fatal(signum, frame) -> None:
    _write(f"{_tool}: {identity()} failed: killed by {signal.Signals(signum).name}")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _excepthook(exc_type, exc, tb) -> None:
    traceback.print_exception(exc_type, exc, tb)
    report_failure(exc)


def arm(tool: str = "mom-train") -> None:
    """Install the handlers (idempotent). Call from the main thread, first thing."""
    global _tool, _armed
    _tool = tool
    # Line-buffered output under every launcher: srun and mpirun hand us a pipe, and a block-
    # buffered log loses the last steps of a rank that is killed.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    if _armed:
        return
    try:
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, _on_preempt)
        for sig in FATAL_SIGNALS:
            signal.signal(sig, _on_fatal)
    except ValueError:  # not the main thread (a test runner's worker thread): nothing to arm
        return
    # A launcher that blocked them (env --block-signal) hands over here; a pending one fires now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPT_SIGNALS + FATAL_SIGNALS)
    sys.excepthook = _excepthook
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError):  # stderr without a file descriptor (captured)
        pass
    _armed = True


def signalled() -> str | None:
    """The first preemption signal this process received, or None."""
    return _received[0] if _received else None


def preempt_agreed(device=None) -> bool:
    """True on every rank when any rank has received a preemption signal (a collective: call it
    at the same point on every rank)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _received else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def safe_point(device, where: str, checkpoint: str | None = None) -> None:
    """A set-up safe point: leave together (PreemptedDuringSetup) if any rank was signalled."""
    if preempt_agreed(device):
        raise PreemptedDuringSetup(where, signalled() or "a signal on another rank", checkpoint)


def report_failure(exc: BaseException) -> None:
    """The one line naming this rank that every failure path writes before the process ends."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _write(f"{_tool}: {identity()} failed: {type(exc).__name__}{': ' + first[:300] if first else ''}")


class PreemptionFlag:
    """Per-step view for the trainer (kept for its old call site): ``agreed(device)``."""

    def __init__(self):
        arm(_tool)  # train() called directly (tests, notebooks) still gets the handlers

    @property
    def flag(self) -> bool:
        return bool(_received)

    def agreed(self, device) -> bool:
        return preempt_agreed(device)
