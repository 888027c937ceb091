"""Read a run's outputs (``metrics.jsonl``, ``config.json``) into plain lists; no trainer imports.

A resumed run appends to the same ``metrics.jsonl``; the trainer first moves the records of the
steps it trains again (those between the last checkpoint and the interruption) to
``metrics.superseded.jsonl``, so each step appears once. Runs of earlier versions may hold a
step twice: the later record wins.
A half-written last line (a job killed mid-write) is ignored; any other unreadable line is an
error naming the line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


class ReportError(Exception):
    """An expected problem with the run directory; mom-report prints it as one line, exit 2."""


@dataclass
class RunData:
    run_dir: str
    train: list[dict] = field(default_factory=list)  # kind == "train", sorted by step
    valid: list[dict] = field(default_factory=list)
    routing: list[dict] = field(default_factory=list)
    config: dict | None = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.run_dir))


def load_run(run_dir: str) -> RunData:
    if not os.path.isdir(run_dir):
        raise ReportError(f"run directory {run_dir} does not exist; pass the train.out_dir of a run")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ReportError(f"{path} not found: {run_dir} is not a run directory (or the run wrote no metrics: "
                          "rank 0 writes metrics.jsonl from the first logged step on)")
    with open(path) as f:
        lines = f.read().split("\n")
    by_kind: dict[str, dict[int, dict]] = {}
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind, step = rec["kind"], int(rec["step"])
        except (ValueError, KeyError, TypeError) as e:
            if i == last:  # an interrupted write; everything before it is intact
                continue
            raise ReportError(f"{path} line {i + 1} is not a metrics record ({e}); repair or delete that line")
        by_kind.setdefault(kind, {})[step] = rec
    run = RunData(run_dir, *[sorted(by_kind.get(k, {}).values(), key=lambda r: r["step"])
                             for k in ("train", "valid", "routing")])
    if not (run.train or run.valid or run.routing):
        raise ReportError(f"{path} holds no train, valid or routing records: nothing to report")
    cfg = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                run.config = json.load(f)
        except ValueError:
            run.config = None  # the figures do not need it
    return run


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry ``key`` as a number."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def chunks_of(routing: list[dict]) -> list[int]:
    return sorted({d["chunk"] for r in routing for d in r.get("detail", [])})


def pick_steps(routing: list[dict], wanted: list[int] | None, n: int = 4) -> list[dict]:
    """The routing records to draw as heatmaps: the ``wanted`` training steps (nearest record
    at or before each), or ``n`` spread evenly from the first to the last."""
    if not routing:
        return []
    if wanted:
        out = []
        for w in wanted:
            before = [r for r in routing if r["step"] <= w]
            rec = before[-1] if before else routing[0]
            if rec not in out:
                out.append(rec)
        return out
    if len(routing) <= n:
        return list(routing)
    idx = sorted({round(i * (len(routing) - 1) / (n - 1)) for i in range(n)})
    return [routing[i] for i in idx]
