"""A huge document cannot blow up mom-preprocess's memory (issue 15).

SentencePiece needs about 55 bytes of memory per input byte to encode one document, so one
20 MB document of NUL bytes took the tool to 1.2 GB (2 GB would need ~100 GB). Documents larger
than --max-document-mb are skipped and counted (`document_too_large`, with where they are), in
every input kind, before they are read whole. The peak RSS of the real CLI process is measured
with getrusage in a wrapper process (a generous bound, not a timing).
"""
import json
import lzma
import subprocess
import sys

import pytest

from mom_dist.data.preprocess import preprocess
from tests.data.conftest import ROOT, write_jsonl
from tests.data.test_preprocess_failures import tar_bytes

HUGE = 20 << 20  # bytes


def peak_rss_mb(args) -> tuple[int, float, str]:
    """Run the CLI in a fresh wrapper process; (exit code, the CLI's peak RSS in MB, stderr)."""
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "sys.stderr.write(p.stderr)\n"
            "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "mom_dist.cli.preprocess",
                           *map(str, args), "--no-progress"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    rc, peak = proc.stdout.split()
    return int(rc), float(peak), proc.stderr


@pytest.mark.parametrize("train_tokenizer", [False, True])
def test_a_huge_document_is_skipped_and_memory_stays_bounded(tmp_path, docs, spm_model, train_tokenizer):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "huge.txt").write_bytes(b"\0" * HUGE)
    write_jsonl(tmp_path / "in" / "small.jsonl", docs)
    args = [tmp_path / "in", "-o", tmp_path / "o" / "p", "--valid-ratio", "0.1"]
    args += ["--vocab-size", "400"] if train_tokenizer else ["--tokenizer-model", spm_model]
    rc, peak, err = peak_rss_mb(args)
    assert rc == 0, err
    assert peak < 400, f"peak RSS {peak:.0f} MB for a {HUGE >> 20} MB document"  # was 1,220 MB
    summary = json.load(open(tmp_path / "o" / "p_summary.json"))
    assert summary["documents"] == len(docs) and summary["max_document_mb"] == 16
    assert summary["skipped"] == {"document_too_large": 1}
    assert summary["skipped_examples"] == [{"where": str(tmp_path / "in" / "huge.txt"), "reason": "document_too_large"}]
    assert "document_too_large" in err and "--max-document-mb" in err


def test_the_cap_applies_to_every_input_kind_and_can_be_raised(tmp_path, docs, spm_model):
    big = "x " * 300_000  # 0.6 MB
    write_jsonl(tmp_path / "a.jsonl", [docs[0], big, docs[1]])
    (tmp_path / "b.txt").write_text(big)
    (tmp_path / "c.tar").write_bytes(tar_bytes([
        ("0.txt", docs[2].encode()), ("1.txt", big.encode()),
        ("2.txt.xz", lzma.compress(big.encode())),  # 0.6 MB once decompressed, a few KB on disk
        ("sub_data.xz", lzma.compress(tar_bytes([("3.txt", docs[3].encode()), ("4.txt", big.encode())])))]))
    (tmp_path / "d.xz").write_bytes(lzma.compress(big.encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [docs[4], big]}), tmp_path / "e.parquet")
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.tar", "d.xz", "e.parquet")]
    s = preprocess(inputs, str(tmp_path / "o1" / "p"), tokenizer_model=spm_model, valid_ratio=0,
                   max_document_mb=0.5)
    assert s["documents"] == 5 and s["skipped"] == {"document_too_large": 7}
    wheres = [e["where"] for e in s["skipped_examples"]]
    assert wheres == [f"{inputs[0]}:2", inputs[1], f"{inputs[2]}/1.txt", f"{inputs[2]}/2.txt.xz",
                      f"{inputs[2]}/sub_data.xz/4.txt", inputs[3], f"{inputs[4]}:row1"]
    s = preprocess(inputs, str(tmp_path / "o2" / "p"), tokenizer_model=spm_model, valid_ratio=0,
                   max_document_mb=1)
    assert s["documents"] == 12 and s["skipped_total"] == 0
    with pytest.raises(ValueError, match="max_document_mb=0: use a positive size in MB"):
        preprocess(inputs, str(tmp_path / "o3" / "p"), tokenizer_model=spm_model, max_document_mb=0)
