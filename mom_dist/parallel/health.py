"""Which rank stopped answering: a heartbeat per rank in the rendezvous store, read when a
collective fails.

gloo and NCCL tell the waiting rank only that a collective timed out ("Timed out waiting 30000ms
for recv") or that a peer's connection closed - not which rank is to blame. Every rank therefore
bumps a counter ``mom_dist/hb/<rank>`` in the job's TCPStore (MASTER_ADDR:MASTER_PORT, its own
client connection) from a daemon thread every ``interval`` seconds. A rank that is stopped
(SIGSTOP, a stuck driver, swapped out) or dead stops counting; ``silent_ranks`` reads the counters
twice, ``3 * interval`` apart, and names those that did not move. Counters, not timestamps: hosts'
clocks may disagree. If the store itself does not answer, it lives in rank 0 (or the torchrun
agent), and that is what we say.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

_KEY = "mom_dist/hb/{}"
_beat: "Heartbeat | None" = None


def _client(timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class Heartbeat:
    def __init__(self, rank: int, world: int, interval: float = 1.0):
        self.rank, self.world, self.interval = rank, world, interval
        self.store = _client(10)
        self.thread = threading.Thread(target=self._run, name="mom-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while True:
            n += 1
            try:
                self.store.set(_KEY.format(self.rank), str(n))
            except Exception:  # the store is gone (job ending): nothing left to report to
                return
            time.sleep(self.interval)


def start(rank: int, world: int, interval: float = 1.0) -> None:
    """Start this rank's heartbeat (once; a no-op for one process or without a store address)."""
    global _beat
    if _beat is None and world > 1 and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        try:
            _beat = Heartbeat(rank, world, interval)
        except Exception:  # no store reachable: failures are still reported, without names
            _beat = None


def silent_ranks() -> tuple[list[int] | None, str]:
    """(ranks whose heartbeat stopped, explanation); (None, why) when it cannot be told."""
    if _beat is None:
        return None, "no heartbeat running"
    me, world, wait = _beat.rank, _beat.world, 3 * _beat.interval
    keys = [_KEY.format(r) for r in range(world)]
    try:
        store = _client(5)
        first = [store.get(k).decode() if store.check([k]) else None for k in keys]
        time.sleep(wait)
        second = [store.get(k).decode() if store.check([k]) else None for k in keys]
    except Exception:
        holder = "the torchrun agent" if os.environ.get("TORCHELASTIC_RUN_ID") else "rank 0"
        return ([] if holder != "rank 0" else [0]), (f"the rendezvous store ({holder}, "
                                                     f"{os.environ.get('MASTER_ADDR')}) is not answering")
    silent = [r for r in range(world) if r != me and (second[r] is None or first[r] == second[r])]
    return silent, (f"no heartbeat for {wait:.0f} s from rank(s) {', '.join(map(str, silent))}" if silent
                    else "every rank's heartbeat is still running")


def classify(exc: BaseException) -> str | None:
    """'timeout' for a collective that timed out, 'peer' for a peer that went away, else None."""
    text = f"{type(exc).__name__}: {exc}"
    if "timed out" in text.lower() or "collective operation timeout" in text.lower():  # gloo / NCCL watchdog
        return "timeout"
    if any(w in text for w in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                               "NCCL communicator was aborted", "ECONNREFUSED", "Connection refused")):
        return "peer"
    return None
