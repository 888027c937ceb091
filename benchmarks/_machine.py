"""One line describing where a benchmark ran: date, CPU, core count, torch, git commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def describe() -> str:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "mom_dist"], capture_output=True, text=True,
                               cwd=ROOT).stdout
        commit += " (mom_dist/ has uncommitted changes)" if dirty.strip() else ""
    except OSError:
        commit = "?"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"date {datetime.datetime.now().isoformat(timespec='seconds')}, {cpu}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, git {commit}")
