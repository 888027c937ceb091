"""Readers of every input format: each streams one input's documents as `Record`s.

    read_txt        a .txt file: one document
    read_jsonl      JSON lines (.jsonl/.json, .gz/.zst by extension): text in `text_field`
    read_parquet    a column of a parquet file, in record batches
    read_tar        a tar (any compression, by its magic bytes) in the OpenWebText layout:
                    .txt members, .txt.xz members, .xz-compressed tars of .txt (read as streams)
    read_xz         a lone .xz: one document, or a tar
    read_saved      a `datasets` save_to_disk folder, in memory-mapped batches
    read_hub        a hub dataset, streamed

A `Record` carries either the text or why it was skipped (the `SKIP_*` reasons the summary
counts). `max_bytes` caps one document's size: larger ones are skipped as `SKIP_TOO_LARGE`
without being read whole where their size is known first (files, tar members, JSON lines).
A stream that is corrupt or ends early raises `CorruptInputError` naming the file and offset
(`streams.py` makes every decompressor and tar check its end). `corpus.py` picks the reader.
"""
from __future__ import annotations

import contextlib
import io
import json
import lzma
import os
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

from mom_dist.data import streams

# Reasons a record is skipped; the summary counts them under these names.
SKIP_EMPTY = "empty_document"
SKIP_UTF8 = "invalid_utf8"
SKIP_JSON = "malformed_json"
SKIP_FIELD = "missing_text_field"
SKIP_TOO_LARGE = "document_too_large"  # above max_bytes (mom-preprocess --max-document-mb)


class InputError(ValueError):
    """An input cannot be read at all (missing, unreadable, unknown kind). Raised up front."""


class CorruptInputError(InputError):
    """An input turned out corrupt while streaming it; the message names the file and offset."""


# What decompressors and readers raise on corrupt or truncated data (streams.py turns zstd's
# errors into these).
STREAM_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, tarfile.TarError)


def corrupt(path: str, offset, err, fix: str = "re-download or remove it from the inputs"):
    return CorruptInputError(
        f"input {path!r} is corrupt or truncated at {offset} ({type(err).__name__}: {err}); {fix}"
    )


@dataclass
class Record:
    """One input document: `text`, or `skip` (a reason above) with `where` for the report."""

    text: Optional[str]
    skip: Optional[str] = None
    where: str = ""


# --------------------------------------------------------------------------- readers


def read_txt(path: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    """One document: the whole file."""
    try:
        if _over(os.path.getsize(path), max_bytes):
            yield Record(None, SKIP_TOO_LARGE, path)
            return
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise corrupt(path, "byte 0", err, "check the file and its permissions") from err
    yield _decode(data, path)


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


def open_jsonl(path: str):
    """JSON lines, decompressed by extension (.gz: gzip, .zst: zstd; a mismatch is an error)."""
    return streams.open_stream(path, "gz" if path.endswith(".gz") else "zst" if path.endswith(".zst") else None)


def read_jsonl(path: str, text_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    offset, lineno = 0, 0
    with open_jsonl(path) as raw:
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
            except STREAM_ERRORS as err:
                where = "decompressed byte" if path.endswith((".gz", ".zst")) else "byte"
                raise corrupt(path, f"{where} {offset} (after line {lineno})", err) from err
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


def read_parquet(path: str, text_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)  # reads the footer (schema, row groups), written last
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
        raise corrupt(path, "its footer", err) from err
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
            raise corrupt(path, f"row {row}", err) from err
        for text in batch.column(0).to_pylist():
            yield _text_record(text, f"{path}:row{row}", max_bytes=max_bytes)
            row += 1


def read_tar(fileobj_or_path, where: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
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
        except STREAM_ERRORS as err:
            raise corrupt(where, "tar byte 0", err) from err
        yield from _tar_members(tar, where, max_bytes)
        try:
            streams.check_tar_end(tar)
            streams.drain(stream)
        except STREAM_ERRORS as err:
            raise corrupt(where, f"tar byte {tar.offset} (its end)", err) from err


def _tar_members(tar, where: str, max_bytes: Optional[int]) -> Iterator[Record]:
    offset = 0  # of the last member header in the (decompressed) tar stream
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except STREAM_ERRORS as err:
            raise corrupt(where, f"tar byte {offset} (after the member there)", err) from err
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
        except STREAM_ERRORS as err:
            raise corrupt(where, f"member {member.name!r} (tar byte {offset})", err) from err
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
                yield from read_tar(lzma.LZMAFile(io.BytesIO(data)), name, max_bytes)  # streamed
            elif _over(len(head), max_bytes):
                yield Record(None, SKIP_TOO_LARGE, name)
            elif not xz.eof:
                raise EOFError("the .xz stream ends early")
            else:
                yield _decode(head, name)
        except (lzma.LZMAError, EOFError) as err:
            raise corrupt(where, f"member {member.name!r} (tar byte {offset}), a truncated or "
                           "corrupt .xz", err, "re-download the archive") from err


def _looks_like_tar(data: bytes) -> bool:
    return len(data) >= 512 and data[257:262] == b"ustar"


def read_xz(path: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    try:
        with lzma.open(path) as f:
            head = f.read(512)
    except STREAM_ERRORS as err:
        raise corrupt(path, "decompressed byte 0", err) from err
    if _looks_like_tar(head):
        yield from read_tar(path, path, max_bytes)
    else:
        try:
            with lzma.open(path) as f:
                data = f.read(-1 if max_bytes is None else max_bytes + 1)  # a short read is the end
        except STREAM_ERRORS as err:
            raise corrupt(path, "a decompressed byte past 0 (one document)", err) from err
        yield _decode(data, path, max_bytes)


def read_saved(path: str, text_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
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


def read_hub(spec: str, text_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    import datasets

    name, _, split = spec[len("hub:"):].partition(":")
    ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    for i, row in enumerate(ds):
        yield _text_record(row.get(text_field), f"{spec}:row{i}", check_surrogates=True, max_bytes=max_bytes)


