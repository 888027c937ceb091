"""What `mom-preprocess` keeps on disk to resume, refuse or replace safely (`preprocess.py`).

- `output_paths(prefix)`: every file a run writes for a prefix, and its work directory and lock;
- `Settings` + `input_fingerprint`: what the output depends on, stored in
  `PREFIX_work/settings.json`, so a rerun resumes only the same run on the same inputs
  (`describe_change` names what changed);
- `prefix_lock`: one run per prefix (`PREFIX_preprocess.lock`, `mom_dist.file_lock`, as mom-train);
- atomic JSON files, a work directory removed so that a kill half-way leaves no half-deleted
  one, and the errors the CLI maps to exit codes (`OutputExistsError`, `PrefixInUseError`: 2;
  `WorkDirError`: 1).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

from mom_dist.file_lock import release_lock, take_lock

SPLITS = ("train", "valid")
_FINGERPRINT_BYTES = 8192  # hashed from the start and from the end of every input file


class OutputExistsError(FileExistsError):
    """The output prefix already holds results and --overwrite was not given."""


class PrefixInUseError(OutputExistsError):
    """Another mom-preprocess holds the output prefix's lock; the message names it."""


class WorkDirError(OSError):
    """A shard in the work directory does not hold what its record says (written by something
    else, or damaged); its record is removed so that rerunning the command redoes it."""


@contextlib.contextmanager
def prefix_lock(path: str, prefix: str):
    """Hold `path` (PREFIX_preprocess.lock) while the run works: a second run on the prefix stops
    at once naming the first (host, pid, start); a lock whose process is gone is taken over.
    The lock code is the one mom-train's out_dir lock uses (`mom_dist.file_lock`)."""
    def note(line):
        print(f"mom-preprocess: note: {line.removeprefix('[mom_dist] ')}", file=sys.stderr)

    try:
        holder = take_lock(path, note, f"output prefix {prefix!r}", "mom-preprocess",
                           "wait for it to finish or stop it, or use another --output-prefix")
    except ValueError as err:
        raise PrefixInUseError(str(err)) from None
    try:
        yield
    finally:
        release_lock(path, holder["token"])


@dataclass
class Settings:
    """What the output depends on; stored in the work dir so a resume can check it matches."""

    files: list
    text_field: str
    shard_mb: float
    valid_ratio: float
    seed: int
    tokenizer_model: Optional[str]
    tokenizer_identity: Optional[str]
    vocab_size: Optional[int]             # the four training options: None with a given tokenizer
    model_type: Optional[str]
    tokenizer_train_mb: Optional[float]
    input_sentence_size: Optional[int]
    max_document_mb: float = 16.0         # larger documents are skipped (document_too_large)

    def max_bytes(self) -> int:
        return int(self.max_document_mb * 1024 * 1024)


def output_paths(prefix: str) -> dict:
    """Every path `preprocess` writes for `prefix` (see `preprocess` for what each holds)."""
    return {
        "train": f"{prefix}_train_text_document",
        "valid": f"{prefix}_valid_text_document",
        "tokenizer": f"{prefix}_tokenizer.model",
        "summary": f"{prefix}_summary.json",
        "work": f"{prefix}_work",
        "lock": f"{prefix}_preprocess.lock",
        "prefix": prefix,
    }


def all_outputs(paths: dict) -> list[str]:
    """Every file a finished run may have written for the prefix (summary last)."""
    out = [paths[s] + ext for s in SPLITS for ext in (".bin", ".idx", ".meta.json")]
    return out + [paths["tokenizer"], paths["summary"]]


def existing_outputs(paths: dict) -> list[str]:
    return [p for p in all_outputs(paths) if os.path.exists(p)]


def write_json(path: str, obj) -> None:
    """Write atomically and durably: a reader sees the old file or the complete new one."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- input fingerprint


def _file_print(path: str) -> dict:
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if st.st_size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, st.st_size - _FINGERPRINT_BYTES))
            h.update(f.read())
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


def input_fingerprint(files: list[str]) -> list[dict]:
    """Path, size, mtime and a hash of the first and last 8 KiB of every input file.

    A saved dataset folder contributes every file in it; `hub:` inputs only their name (a
    remote dataset cannot be fingerprinted here). Costs two small reads per file.
    """
    out = []
    for f in files:
        if f.startswith("hub:"):
            out.append({"path": f})
        elif os.path.isdir(f):
            for root, dirs, names in os.walk(f):
                dirs.sort()
                out.extend(_file_print(os.path.join(root, n)) for n in sorted(names))
        else:
            out.append(_file_print(f))
    return out


def describe_change(old: list, new: list) -> str:
    before = {d["path"]: d for d in old}
    after = {d["path"]: d for d in new}
    for path, d in after.items():
        if path not in before:
            return f"{path} is new"
        for key, what in (("size", "size"), ("mtime_ns", "modification time"),
                          ("head_tail_sha256", "content")):
            if before[path].get(key) != d.get(key):
                return f"{path} changed ({what}: {before[path].get(key)} -> {d.get(key)})"
    for path in before:
        if path not in after:
            return f"{path} is gone"
    return "the input order changed"


def state_hash(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def makedirs(path: str) -> list[str]:
    """os.makedirs, returning the directories it created (outermost first)."""
    made, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return made[::-1]


def remove_tree(path: str) -> None:
    """Remove a work directory so that a kill half-way leaves no half-deleted one behind."""
    if os.path.isdir(path):
        trash = path if path.endswith(".trash") else path + ".trash"
        if trash != path:
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(path, trash)
        shutil.rmtree(trash)
