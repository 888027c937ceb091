"""Corpus inputs for preprocessing: the offline default corpus, input discovery and checks.

Every input kind is turned into one stream of `Record`s, in a fixed order, without ever
holding the corpus in memory:

    hub:NAME[:SPLIT]         a hub dataset, streamed with `datasets` (needs a reachable hub)
    DIR with dataset_info.json / state.json   a dataset saved with `save_to_disk`
    DIR                      every *.txt, *.jsonl[.gz|.zst], *.parquet, *.tar, *.xz below it,
                             sorted by path relative to DIR in byte order (`find DIR | LC_ALL=C
                             sort`); other files are ignored and reported (`check_inputs`)
    FILE.txt                 one document
    FILE.jsonl / .json / .jsonl.gz / .jsonl.zst   one JSON object per line, text in `text_field`
    FILE.parquet             rows, text in `text_field` (read in record batches with pyarrow)
    FILE.tar / .tar.xz / .tar.gz / .xz   an archive in the OpenWebText layout: members are
                             .txt documents, .xz-compressed .txt documents, or .xz-compressed
                             tars of .txt documents (OpenWebText's `urlsf_subset*_data.xz`),
                             read in member order (an archive and its unpacked folder hold the
                             same documents, usually in a different order)

The readers of each format are in `readers.py`, decompression in `streams.py`. A `Record`
carries either the text or the reason it was skipped (malformed JSON, invalid UTF-8 or a lone
surrogate escape, missing field, empty document, larger than `max_bytes`), so bad records are
counted and reported, not fatal. Problems with the inputs themselves (missing path, dangling
symlink, unreadable archive, truncated .xz) raise `InputError` before any output is written
(`check_inputs`); corruption only visible while streaming (a .gz/.zst/.bz2 stream or a tar
that ends early, a bad member inside a tar) raises `CorruptInputError` naming the file and the
byte offset where reading failed.
"""
from __future__ import annotations

import errno
import json
import lzma
import os
import random
from typing import Callable, Iterator, Optional

from mom_dist.data import readers, streams
from mom_dist.data.readers import (  # noqa: F401  (part of this module's interface)
    SKIP_EMPTY, SKIP_FIELD, SKIP_JSON, SKIP_TOO_LARGE, SKIP_UTF8, CorruptInputError, InputError, Record,
)

_TEXT_SUFFIXES = (".txt",)
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_PARQUET_SUFFIXES = (".parquet",)
_ARCHIVE_SUFFIXES = (".tar", ".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".xz")
_ALL_SUFFIXES = _TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES + _ARCHIVE_SUFFIXES


# --------------------------------------------------------------------------- default corpus


def _doc_paragraphs() -> list[str]:
    """Paragraphs of the CPython documentation topics shipped with the interpreter."""
    from pydoc_data.topics import topics  # stdlib: ~465 KB of English prose and code

    paragraphs = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            if para.strip():
                paragraphs.append(para.strip("\n"))
    return paragraphs


def write_default_corpus(out_dir: str, target_mb: float = 2.0) -> str:
    """Write an offline English corpus as JSON lines and return its path.

    Documents are built from the CPython documentation topics (`pydoc_data.topics`): each
    document joins 3-12 paragraphs drawn by a fixed-seed RNG, so the file is identical on
    every machine and run, and any size can be reached without downloads. The first pass
    uses every topic once, in order, as its own document. Output: `{out_dir}/default_corpus.jsonl`
    with one `{"text": ...}` per line.
    """
    from pydoc_data.topics import topics

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "default_corpus.jsonl")
    target = int(target_mb * 1024 * 1024)
    rng = random.Random(1234)
    paragraphs = _doc_paragraphs()
    written = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for key in sorted(topics):  # every topic once, as its own document
            line = json.dumps({"text": topics[key]}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            if written >= target:
                break
        while written < target:
            doc = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(3, 12)))
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- input discovery


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_info.json"))
        or os.path.exists(os.path.join(path, "state.json"))
        or os.path.exists(os.path.join(path, "dataset_dict.json"))
    )


def _expand(path: str, ignored: Optional[list] = None) -> list[str]:
    """The files one input path stands for; a saved dataset or hub name is itself.

    A folder gives every readable file below it, sorted by its path relative to the folder
    (byte order, so `a.txt` < `a/b.txt` < `b.txt`, like `find DIR | LC_ALL=C sort`). Files of
    other kinds are appended to `ignored` so the caller can report them.
    """
    if path.startswith("hub:") or _is_saved_dataset(path):
        return [path]
    if os.path.isdir(path):
        found = []
        for root, dirs, names in os.walk(path):
            for name in names:
                full = os.path.join(root, name)
                if name.endswith(_ALL_SUFFIXES):
                    found.append(full)
                elif ignored is not None:
                    ignored.append(full)
        found.sort(key=lambda f: os.path.relpath(f, path).encode("utf-8", "surrogateescape"))
        return found
    return [path]


def check_inputs(inputs: list[str], ignored: Optional[list] = None) -> list[str]:
    """Resolve the inputs to a file list (folders expanded, see `_expand`); raise InputError
    for anything unreadable.

    Checks existence, that each file has a known kind, that archives and compressed files open
    and that .xz streams are complete (their footer is present), so a bad input stops the run
    before a single output byte is written. Files of unknown kinds found inside folders are
    appended to `ignored`.
    """
    if not inputs:
        raise InputError("no inputs given: pass at least one file, directory or hub:NAME")
    files: list[str] = []
    for path in inputs:
        if path.startswith("hub:"):
            files.append(path)
            continue
        _check_link(path)
        if not os.path.exists(path):
            raise InputError(f"input not found: {path!r}; check the path (inputs are read, never created)")
        expanded = _expand(path, ignored)
        if not expanded:
            raise InputError(
                f"input directory {path!r} holds no readable files "
                f"(expected any of: {', '.join(_ALL_SUFFIXES)}, or a datasets save_to_disk folder)"
            )
        for f in expanded:
            if f != path or not os.path.isdir(f):
                _check_file(f)
        files.extend(expanded)
    return files


def _check_file(path: str) -> None:
    if _is_saved_dataset(path):
        return
    _check_link(path)
    if not os.access(path, os.R_OK):
        raise InputError(f"input {path!r} is not readable; fix its permissions")
    if not path.endswith(_ALL_SUFFIXES):
        raise InputError(
            f"input {path!r} has an unknown kind; use one of {', '.join(_ALL_SUFFIXES)}, "
            "a directory of them, a datasets save_to_disk folder, or hub:NAME"
        )
    if path.endswith(".xz"):
        _check_xz_footer(path)
    if path.endswith((".gz", ".zst")) and not path.endswith(_ARCHIVE_SUFFIXES):
        try:
            with readers.open_jsonl(path) as f:
                f.read(1)
        except Exception as err:  # gzip/zstd raise several unrelated types on garbage
            raise InputError(f"cannot read compressed file {path!r} ({err}); it is corrupt or not "
                             f"{path.rsplit('.', 1)[-1]}-compressed. Re-create it or remove it from the inputs") from err
    if path.endswith(_ARCHIVE_SUFFIXES):
        try:
            with streams.open_stream(path) as f, streams.open_tar(f):
                pass  # opening reads the first member's header
        except readers.STREAM_ERRORS as err:
            if path.endswith(".xz") and not path.endswith(".tar.xz"):
                try:  # a lone .xz document (not a tar) is fine too
                    with lzma.open(path) as f:
                        f.read(1)
                    return
                except (lzma.LZMAError, EOFError, OSError):
                    pass
            raise InputError(
                f"cannot read archive {path!r} ({' '.join(str(err).split())}); it is corrupt or not a "
                "tar/xz file. Re-download it or remove it from the inputs"
            ) from err


def _check_link(path: str) -> None:
    """A symlink whose target is missing (or that loops) is named as such, with its target."""
    if os.path.islink(path) and not os.path.exists(path):
        target = os.readlink(path)
        try:
            os.stat(path)
            why = "is a symlink that cannot be followed"
        except FileNotFoundError:
            why = f"is a dangling symlink: it points to {target!r}, which does not exist"
        except OSError as err:
            why = (f"is a symlink loop: it points to {target!r}, which leads back to it" if err.errno == errno.ELOOP
                   else f"is a symlink to {target!r} that cannot be followed ({err.strerror})")
        raise InputError(f"input {path!r} {why}; fix or remove the link")


def _check_xz_footer(path: str) -> None:
    """A complete .xz file ends with a stream footer whose last two bytes are b"YZ" (xz format
    spec 2.1.2.4, before any null stream padding); a truncated download does not. Reads the
    last KiB, so it is free up front."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(6)
        f.seek(max(0, size - 1024))
        tail = f.read().rstrip(b"\x00")  # stream padding (null bytes) may follow the footer
    if magic == b"\xfd7zXZ\x00" and (size < 12 or not tail.endswith(b"YZ")):
        raise InputError(
            f"xz file {path!r} is truncated ({size} bytes, no end-of-stream footer); re-download it "
            "or remove it from the inputs"
        )


def reader_for(path: str, text_field: str, max_bytes: Optional[int] = None) -> Callable[[], Iterator[Record]]:
    """A zero-argument function that streams the records of one resolved input (`readers.py`).

    max_bytes: documents (records) larger than this are skipped as `document_too_large`,
    without being read whole where their size is known first (files, tar members, JSON lines).
    """
    if path.startswith("hub:"):
        return lambda: readers.read_hub(path, text_field, max_bytes)
    if _is_saved_dataset(path):
        return lambda: readers.read_saved(path, text_field, max_bytes)
    if path.endswith(_TEXT_SUFFIXES):
        return lambda: readers.read_txt(path, max_bytes)
    if path.endswith(_JSONL_SUFFIXES):
        return lambda: readers.read_jsonl(path, text_field, max_bytes)
    if path.endswith(_PARQUET_SUFFIXES):
        return lambda: readers.read_parquet(path, text_field, max_bytes)
    if path.endswith(".xz") and not path.endswith(".tar.xz"):
        return lambda: readers.read_xz(path, max_bytes)
    if path.endswith(_ARCHIVE_SUFFIXES):
        return lambda: readers.read_tar(path, path, max_bytes)
    raise InputError(f"unknown input kind: {path!r}")


def iter_records(files: list[str], text_field: str = "text",
                 max_bytes: Optional[int] = None) -> Iterator[tuple[int, Record]]:
    """Stream (file index, record) over resolved inputs, in order. Bounded memory (per document
    too with `max_bytes`: see `reader_for`)."""
    for i, path in enumerate(files):
        for record in reader_for(path, text_field, max_bytes)():
            yield i, record


def input_bytes(files: list[str]) -> int:
    """Total on-disk size of the resolved inputs (the progress bar's denominator)."""
    total = 0
    for f in files:
        if os.path.isfile(f):
            total += os.path.getsize(f)
    return total


__all__ = [
    "InputError", "CorruptInputError", "Record", "write_default_corpus", "check_inputs", "iter_records",
    "reader_for", "input_bytes", "SKIP_EMPTY", "SKIP_UTF8", "SKIP_JSON", "SKIP_FIELD", "SKIP_TOO_LARGE",
]
