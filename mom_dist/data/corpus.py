"""Corpus inputs for preprocessing: the offline default corpus and streaming readers.

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

A `Record` carries either the text or the reason it was skipped (malformed JSON, invalid
UTF-8 or a lone surrogate escape, missing field, empty document, larger than `max_bytes`), so
bad records are counted and reported, not fatal. Problems with the inputs themselves (missing path, unreadable archive,
truncated .xz) raise `InputError` before any output is written (`check_inputs`); corruption only
visible while streaming (a .gz/.zst/.bz2 stream or a tar that ends early, a bad member inside a
tar: `streams.py`) raises `CorruptInputError` naming the file and the byte offset where reading
failed.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import lzma
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from mom_dist.data import streams

# Reasons a record is skipped; the summary counts them under these names.
SKIP_EMPTY = "empty_document"
SKIP_UTF8 = "invalid_utf8"
SKIP_JSON = "malformed_json"
SKIP_FIELD = "missing_text_field"
SKIP_TOO_LARGE = "document_too_large"  # above max_bytes (mom-preprocess --max-document-mb)

_TEXT_SUFFIXES = (".txt",)
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_PARQUET_SUFFIXES = (".parquet",)
_ARCHIVE_SUFFIXES = (".tar", ".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".xz")
_ALL_SUFFIXES = _TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES + _ARCHIVE_SUFFIXES


class InputError(ValueError):
    """An input cannot be read at all (missing, unreadable, unknown kind). Raised up front."""


class CorruptInputError(InputError):
    """An input turned out corrupt while streaming it; the message names the file and offset."""


# What decompressors and readers raise on corrupt or truncated data (streams.py turns zstd's
# errors into these).
_STREAM_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, tarfile.TarError)


def _corrupt(path: str, offset, err, fix: str = "re-download or remove it from the inputs"):
    return CorruptInputError(
        f"input {path!r} is corrupt or truncated at {offset} ({type(err).__name__}: {err}); {fix}"
    )


@dataclass
class Record:
    """One input document: `text`, or `skip` (a reason above) with `where` for the report."""

    text: Optional[str]
    skip: Optional[str] = None
    where: str = ""


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
            with _open_jsonl(path) as f:
                f.read(1)
        except Exception as err:  # gzip/zstd raise several unrelated types on garbage
            raise InputError(f"cannot read compressed file {path!r} ({err}); it is corrupt or not "
                             f"{path.rsplit('.', 1)[-1]}-compressed. Re-create it or remove it from the inputs") from err
    if path.endswith(_ARCHIVE_SUFFIXES):
        try:
            with streams.open_stream(path) as f, streams.open_tar(f):
                pass  # opening reads the first member's header
        except _STREAM_ERRORS as err:
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


# --------------------------------------------------------------------------- readers


def _over(size: int, max_bytes: Optional[int]) -> bool:
    return max_bytes is not None and size > max_bytes


def _decode(data: bytes, where: str, max_bytes: Optional[int] = None) -> Record:
    if _over(len(data), max_bytes):
        return Record(None, SKIP_TOO_LARGE, where)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Record(None, SKIP_UTF8, where)
    return _text_record(text, where)


def _text_record(text, where: str, check_surrogates: bool = False, max_bytes: Optional[int] = None) -> Record:
    if not isinstance(text, str):
        return Record(None, SKIP_FIELD, where)
    # Size in UTF-8 bytes; encoding to count only when the length in characters leaves it open.
    if _over(len(text), max_bytes) or (_over(4 * len(text), max_bytes)
                                       and _over(len(text.encode("utf-8", "surrogatepass")), max_bytes)):
        return Record(None, SKIP_TOO_LARGE, where)
    if not text.strip():
        return Record(None, SKIP_EMPTY, where)
    if check_surrogates:
        # JSON may escape a lone surrogate (valid JSON, not valid Unicode): SentencePiece
        # cannot take such a str, and no UTF-8 file can hold it.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return Record(None, SKIP_UTF8, where)
    return Record(text, None, where)


def _open_jsonl(path: str):
    """JSON lines, decompressed by extension (.gz: gzip, .zst: zstd; a mismatch is an error)."""
    return streams.open_stream(path, "gz" if path.endswith(".gz") else "zst" if path.endswith(".zst") else None)


def _read_jsonl(path: str, text_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    offset, lineno = 0, 0
    with _open_jsonl(path) as raw:
        stream = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw
        while True:
            try:
                line = stream.readline(-1 if max_bytes is None else max_bytes + 1)
                size = len(line)
                if _over(size, max_bytes):  # a record above the cap: read past it, never holding it
                    while not line.endswith(b"\n"):
                        line = stream.readline(1 << 20)
                        if not line:
                            break
                        size += len(line)
                    line = None
            except _STREAM_ERRORS as err:
                where = "decompressed byte" if path.endswith((".gz", ".zst")) else "byte"
                raise _corrupt(path, f"{where} {offset} (after line {lineno})", err) from err
            if not size:
                break
            lineno += 1
            offset += size
            where = f"{path}:{lineno}"
            if line is None:
                yield Record(None, SKIP_TOO_LARGE, where)
                continue
            if not line.strip():
                continue  # blank lines between records are not documents
            try:
                line_text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield Record(None, SKIP_UTF8, where)
                continue
            try:
                obj = json.loads(line_text)
            except json.JSONDecodeError:
                yield Record(None, SKIP_JSON, where)
                continue
            if not isinstance(obj, dict) or text_field not in obj:
                yield Record(None, SKIP_FIELD, where)
                continue
            yield _text_record(obj[text_field], where, check_surrogates="\\u" in line_text)


def _read_parquet(path: str, text_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise InputError(
            f"parquet file {path!r} has no column {text_field!r} (columns: "
            f"{pf.schema_arrow.names}); pass --text-field"
        )
    row = 0
    batches = pf.iter_batches(batch_size=1024, columns=[text_field])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
            raise _corrupt(path, f"row {row}", err) from err
        for text in batch.column(0).to_pylist():
            yield _text_record(text, f"{path}:row{row}", max_bytes=max_bytes)
            row += 1


def _read_tar(fileobj_or_path, where: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    """Documents of a tar in the OpenWebText layout (see module docstring), in member order.

    Read as a stream (decompressed by its magic bytes); it must end with its end-of-archive
    block, and a compressed file is read to its end, so a cut anywhere is refused.
    """
    with contextlib.ExitStack() as stack:
        stream = fileobj_or_path
        if isinstance(fileobj_or_path, str):
            stream = stack.enter_context(streams.open_stream(fileobj_or_path))
        try:
            tar = stack.enter_context(streams.open_tar(stream))
        except _STREAM_ERRORS as err:
            raise _corrupt(where, "tar byte 0", err) from err
        yield from _tar_members(tar, where, max_bytes)
        try:
            streams.check_tar_end(tar)
            streams.drain(stream)
        except _STREAM_ERRORS as err:
            raise _corrupt(where, f"tar byte {tar.offset} (its end)", err) from err


def _tar_members(tar, where: str, max_bytes: Optional[int]) -> Iterator[Record]:
    offset = 0  # of the last member header in the (decompressed) tar stream
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except _STREAM_ERRORS as err:
            raise _corrupt(where, f"tar byte {offset} (after the member there)", err) from err
        offset = member.offset
        if not member.isfile() or not member.name.endswith((".txt", ".xz")):
            continue
        name = f"{where}/{member.name}"
        if member.name.endswith(".txt") and _over(member.size, max_bytes):
            yield Record(None, SKIP_TOO_LARGE, name)  # not read: the stream skips past it
            continue
        try:
            f = tar.extractfile(member)
            data = f.read() if f is not None else None
        except _STREAM_ERRORS as err:
            raise _corrupt(where, f"member {member.name!r} (tar byte {offset})", err) from err
        if data is None:
            continue
        if member.name.endswith(".txt"):
            yield _decode(data, name)
            continue
        # .xz: one document, or a tar of documents (OpenWebText); decompressed up to the cap
        try:
            xz = lzma.LZMADecompressor()
            head = xz.decompress(data, max_length=-1 if max_bytes is None else max_bytes + 1)
            if not member.name.endswith(".txt.xz") and _looks_like_tar(head):
                yield from _read_tar(lzma.LZMAFile(io.BytesIO(data)), name, max_bytes)  # streamed
            elif _over(len(head), max_bytes):
                yield Record(None, SKIP_TOO_LARGE, name)
            elif not xz.eof:
                raise EOFError("the .xz stream ends early")
            else:
                yield _decode(head, name)
        except (lzma.LZMAError, EOFError) as err:
            raise _corrupt(where, f"member {member.name!r} (tar byte {offset}), a truncated or "
                           "corrupt .xz", err, "re-download the archive") from err


def _looks_like_tar(data: bytes) -> bool:
    return len(data) >= 512 and data[257:262] == b"ustar"


def _read_xz(path: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    try:
        with lzma.open(path) as f:
            head = f.read(512)
    except _STREAM_ERRORS as err:
        raise _corrupt(path, "decompressed byte 0", err) from err
    if _looks_like_tar(head):
        yield from _read_tar(path, path, max_bytes)
    else:
        try:
            with lzma.open(path) as f:
                data = f.read(-1 if max_bytes is None else max_bytes + 1)  # a short read is the end
        except _STREAM_ERRORS as err:
            raise _corrupt(path, "a decompressed byte past 0 (one document)", err) from err
        yield _decode(data, path, max_bytes)


def _read_saved(path: str, text_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = [ds[k] for k in sorted(ds)]
    else:
        splits = [ds]
    for part in splits:
        if text_field not in part.column_names:
            raise InputError(
                f"dataset {path!r} has no column {text_field!r} (columns: {part.column_names}); "
                "pass --text-field"
            )
        # iter() over an Arrow-backed dataset reads memory-mapped batches: bounded memory.
        for i, row in enumerate(part.select_columns([text_field]).iter(batch_size=1024)):
            for j, text in enumerate(row[text_field]):
                yield _text_record(text, f"{path}:row{i * 1024 + j}", max_bytes=max_bytes)


def _read_hub(spec: str, text_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    import datasets

    name, _, split = spec[len("hub:"):].partition(":")
    ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    for i, row in enumerate(ds):
        yield _text_record(row.get(text_field), f"{spec}:row{i}", check_surrogates=True, max_bytes=max_bytes)


def reader_for(path: str, text_field: str, max_bytes: Optional[int] = None) -> Callable[[], Iterator[Record]]:
    """A zero-argument function that streams the records of one resolved input.

    max_bytes: documents (records) larger than this are skipped as `document_too_large`,
    without being read whole where their size is known first (files, tar members, JSON lines).
    """
    if path.startswith("hub:"):
        return lambda: _read_hub(path, text_field, max_bytes)
    if _is_saved_dataset(path):
        return lambda: _read_saved(path, text_field, max_bytes)
    if path.endswith(_TEXT_SUFFIXES):
        def read_txt():
            try:
                if _over(os.path.getsize(path), max_bytes):
                    yield Record(None, SKIP_TOO_LARGE, path)
                    return
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as err:
                raise _corrupt(path, "byte 0", err, "check the file and its permissions") from err
            yield _decode(data, path)
        return read_txt
    if path.endswith(_JSONL_SUFFIXES):
        return lambda: _read_jsonl(path, text_field, max_bytes)
    if path.endswith(_PARQUET_SUFFIXES):
        return lambda: _read_parquet(path, text_field, max_bytes)
    if path.endswith(".xz") and not path.endswith(".tar.xz"):
        return lambda: _read_xz(path, max_bytes)
    if path.endswith(_ARCHIVE_SUFFIXES):
        return lambda: _read_tar(path, path, max_bytes)
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
