"""The names of a run's checkpoint files, and the small files that hold it together.

    <out_dir>/mom_train.lock                    one run per out_dir (``run_lock``)
    <out_dir>/checkpoints/latest                tag of the newest *complete* checkpoint, replaced
                                                atomically once every rank has written its files
    <out_dir>/checkpoints/step00000300/
        state_rank00001.safetensors             rank 1's pieces of the training state (``shards``)
        rng_rank00001.pt                        rank 1's torch/python RNG state (``safe_load``)
        mom_state.json                          step, consumed samples, format, layout, engine
                                                counters and schedule, config, the step's loss and
                                                whether it was finite (``engine_io``), the size and
                                                checksum of every other file (``integrity``) and a
                                                checksum of its own content (``state_xxh3_64``)

This module spells those names; every reader and writer of the format takes them from here. It
also says what a damaged file is (``DamagedCheckpoint``: one line naming the file and the
previous good checkpoint next to it, ``previous_good``).
"""

from __future__ import annotations

import json
import os

import xxhash

CHECKPOINTS = "checkpoints"
CHECKSUM = "xxh3_64"  # the hash of every checksum a checkpoint records (``integrity``)
STATE_CHECKSUM = "state_" + CHECKSUM
LATEST = "latest"
STATE_FILE = "mom_state.json"


def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINTS)


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag[len("step"):])


def rank_file(tag_dir: str, rank: int) -> str:
    """This rank's shard of the training state."""
    return os.path.join(tag_dir, f"state_rank{rank:05d}.safetensors")


def rng_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rng_rank{rank:05d}.pt")


def tags(ckpt_dir: str) -> list[str]:
    """The step directories under ``ckpt_dir``, oldest first (complete or not)."""
    return sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step"))


def read_latest(ckpt_dir: str) -> str | None:
    """The tag ``latest`` names, or None when there is none yet."""
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def write_latest(ckpt_dir: str, tag: str) -> None:
    """Point ``latest`` at ``tag`` in one step (a crash leaves the old or the new name)."""
    tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is truncated, has flipped bits or does not match its record: the
    message names the file, what is wrong, and the previous good checkpoint next to it."""

    def __init__(self, path: str, problem: str):
        self.path = path
        super().__init__(f"checkpoint file '{path}' is damaged ({problem}); {_fallback(os.path.dirname(path))}")


def _fallback(tag_dir: str) -> str:
    prev = previous_good(tag_dir)
    if prev is None:
        return ("there is no earlier checkpoint next to it: restore the file from a copy, or start a new "
                "train.out_dir")
    ckpts, tag = os.path.split(prev)
    return (f"the previous good checkpoint is '{prev}': resume from it by writing '{tag}' into "
            f"'{os.path.join(ckpts, LATEST)}', or pass that directory to mom-convert export, mom-eval or "
            "train.init_from")


def previous_good(tag_dir: str) -> str | None:
    """The newest step directory older than ``tag_dir`` next to it that is complete, finite and
    whose files have their recorded sizes (their checksums are verified when it is read)."""
    ckpts, tag = os.path.split(os.path.normpath(tag_dir))
    try:
        older = [t for t in tags(ckpts) if t < tag] if tag.startswith("step") else []
    except OSError:
        return None
    for t in reversed(older):
        if _intact(os.path.join(ckpts, t)):
            return os.path.join(ckpts, t)
    return None


def _intact(tag_dir: str) -> bool:
    try:
        state = read_state(tag_dir)
    except ValueError:
        return False
    if not state.get("finite", True):
        return False
    files = state.get("files")
    if files is None:  # written before checksums: our format's rank files must all be there
        world = (state.get("layout") or {}).get("world_size", 0) if state.get("format") else 0
        return all(os.path.exists(rank_file(tag_dir, r)) for r in range(world))
    try:
        return all(os.path.getsize(os.path.join(tag_dir, name)) == rec["bytes"] for name, rec in files.items())
    except (OSError, KeyError, TypeError):
        return False


def _state_checksum(state: dict) -> str:
    """The checksum of the state's content (key order and layout of the file do not matter)."""
    body = {k: v for k, v in state.items() if k != STATE_CHECKSUM}
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, default=str).encode())


def read_state(tag_dir: str) -> dict:
    """A checkpoint's ``mom_state.json``; a missing or broken one is an incomplete checkpoint, one
    whose content does not match its recorded checksum a damaged one."""
    path = os.path.join(tag_dir, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"checkpoint '{tag_dir}' is incomplete (no mom_state.json); point 'latest' at a "
                         "complete checkpoint or remove it") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not valid JSON ({e}); point 'latest' at a complete checkpoint") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(path, "it does not hold a JSON object")
    recorded = state.get(STATE_CHECKSUM)
    if recorded is not None and recorded != _state_checksum(state):  # absent: written before checksums
        raise DamagedCheckpoint(path, "its content does not match the checksum it records: flipped bits, or "
                                f"edited (if you edited it on purpose, delete its \"{STATE_CHECKSUM}\" entry)")
    return state


def write_state(tag_dir: str, state: dict) -> None:
    state = json.loads(json.dumps(state, default=str))  # what a reader will see (tuples as lists, ...)
    state[STATE_CHECKSUM] = _state_checksum(state)
    with open(os.path.join(tag_dir, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)


def is_finite(tag_dir: str) -> bool:
    """Whether the checkpoint holds a finite step (those written before the record count as
    finite; an incomplete one does not)."""
    try:
        with open(os.path.join(tag_dir, STATE_FILE)) as f:
            return bool(json.load(f).get("finite", True))
    except (OSError, ValueError):
        return False


def latest_state(out_dir: str) -> tuple[str, dict] | None:
    """(tag, mom_state) of the checkpoint a run in ``out_dir`` would resume from, or None."""
    ckpts = checkpoints_dir(out_dir)
    tag = read_latest(ckpts)
    return None if tag is None else (tag, read_state(os.path.join(ckpts, tag)))


def find_tag_dir(path: str, tag: str | None = None) -> str:
    """The step directory meant by ``path``: a run directory, its ``checkpoints/`` or a step
    directory (``tag``, else ``latest``, picks the step)."""
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    ckpts = checkpoints_dir(path) if os.path.isdir(checkpoints_dir(path)) else path
    if tag is None:
        if not os.path.exists(os.path.join(ckpts, LATEST)):
            raise ValueError(f"'{path}' holds no 'latest' file and no mom_state.json: pass a run directory, its "
                             "checkpoints/ directory or one step directory")
        tag = read_latest(ckpts) or ""
    tag_dir = os.path.join(ckpts, tag)
    if not os.path.exists(os.path.join(tag_dir, STATE_FILE)):
        raise ValueError(f"checkpoint '{tag_dir}' is incomplete (no mom_state.json)")
    return tag_dir
