"""A compressed input that ends early is refused, whatever its kind (issue 15).

Before, a truncated `.jsonl.zst` was accepted (exit 0 with a fraction of its documents; with
`--overwrite` it replaced a good output), and so were a `.tar.gz`/`.tar.bz2` cut in their last
bytes and a plain `.tar` cut at any point. Each kind is written complete, then cut mid-stream
and in its last bytes: the run is refused with one line naming the file (exit 2), the previous
outputs stay byte-identical and no work directory is left. Complete inputs of every kind
(multi-frame zstd and multi-member gzip included) still give every document.
"""
import bz2
import gzip
import io
import json
import lzma
import tarfile

import pytest

from mom_dist.data.preprocess import preprocess
from tests.data.test_preprocess_failures import assert_refused, intact, prev, run_cli, tar_bytes  # noqa: F401

N = 30


def _jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def _zstd(data: bytes, frames: int = 1) -> bytes:
    import zstandard

    step = -(-len(data) // frames)
    return b"".join(zstandard.ZstdCompressor().compress(data[i:i + step]) for i in range(0, len(data), step))


def kinds(docs):
    """{file name: complete bytes}: every compressed (and archive) input kind mom-preprocess reads."""
    docs = docs[:N]
    lines = _jsonl(docs)
    tar = tar_bytes([(f"{i}.txt", d.encode()) for i, d in enumerate(docs)])
    half = N // 2
    owt = tar_bytes([("a/urlsf_subset00-0_data.xz", lzma.compress(tar_bytes([(f"{i}.txt", d.encode())
                                                                              for i, d in enumerate(docs[:half])]))),
                     ("b/doc.txt.xz", lzma.compress(b"\n".join(d.encode() for d in docs[half:])))])
    return {
        "a.jsonl.zst": _zstd(lines),
        "b.jsonl.zst": _zstd(lines, frames=3),
        "c.json.gz": gzip.compress(lines[:len(lines) // 2]) + gzip.compress(lines[len(lines) // 2:]),
        "d.tar.gz": gzip.compress(tar),
        "e.tgz": gzip.compress(tar),
        "f.tar.bz2": bz2.compress(tar),
        "g.tar.xz": lzma.compress(tar),
        "h.xz": lzma.compress(tar),
        "i.tar": tar,
        "j.tar": owt,
    }


def expected_documents(name):
    return N // 2 + 1 if name == "j.tar" else N


def test_complete_inputs_of_every_kind_give_every_document(tmp_path, docs, spm_model):
    for name, data in kinds(docs).items():
        (tmp_path / name).write_bytes(data)
        s = preprocess([str(tmp_path / name)], str(tmp_path / "out" / name / "p"), tokenizer_model=spm_model,
                       valid_ratio=0)
        assert s["documents"] == expected_documents(name) and s["skipped_total"] == 0, name


def _cuts(name, data):
    """Where to cut: inside the stream, and in its last bytes (the end marker or checksum). A
    plain tar's last bytes are padding, so it is cut exactly after a member instead (no
    end-of-archive blocks follow)."""
    if name.endswith(".tar"):  # its second half is padding: cut inside the first member instead
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            first, last = t.getmembers()[0], t.getmembers()[-1]
        return {"middle": first.offset_data + first.size // 2, "at a member boundary": last.offset}
    return {"middle": len(data) * 2 // 3 + 1, "last bytes": len(data) - 3}


@pytest.mark.parametrize("name", sorted(kinds([f"d{i} text" for i in range(N)])))
def test_truncated_input_is_refused_and_previous_outputs_survive(tmp_path, docs, prev, capsys, name):
    data = kinds(docs)[name]
    for where, cut in _cuts(name, data).items():
        path = tmp_path / "in" / where.replace(" ", "_") / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data[:cut])
        code, err = run_cli(capsys, path, "-o", prev["prefix"], "--overwrite", "--vocab-size", "400",
                            "--valid-ratio", "0.1")
        assert_refused(code, err, str(path))
        assert "truncated" in err or "corrupt" in err, err
        intact(prev)


def test_truncated_parquet_is_refused_naming_the_file(tmp_path, docs, prev, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[:len(data) // 2])  # its footer (the schema) is gone
    code, err = run_cli(capsys, tmp_path / "t.parquet", "-o", prev["prefix"], "--overwrite", "--vocab-size", "400")
    assert_refused(code, err, str(tmp_path / "t.parquet"), "corrupt or truncated")
    intact(prev)
