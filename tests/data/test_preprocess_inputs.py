"""mom-preprocess on every input kind: documents in == documents out, tokens decode to the text."""
import gzip
import io
import json
import lzma
import os
import tarfile

import numpy as np

from mom_dist.data.preprocess import preprocess
from mom_dist.data.tokenizer import Tokenizer
from tests.data.conftest import write_jsonl


def read_docs(prefix, eod):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    out = []
    for i in range(len(ds)):
        ids = np.array(ds[i])  # copy: the mmap closes with ds
        assert ids[-1] == eod and eod not in ids[:-1]
        out.append(ids[:-1])
    return out


def check_roundtrip(summary, docs, model):
    tok = Tokenizer(model)
    got = []
    for split in ("train", "valid"):
        got += [tok.decode(ids) for ids in read_docs(summary["outputs"][split], tok.eod)]
    assert summary["documents"] == len(docs) == len(got)
    assert summary["valid"]["documents"] >= 1
    # train/valid split reorders; compare as multisets, exact text (identity normalisation)
    assert sorted(got) == sorted(docs)


def run(inputs, tmp_path, spm_model, **kw):
    kw.setdefault("tokenizer_model", spm_model)
    return preprocess(inputs, str(tmp_path / "out" / "p"), valid_ratio=0.1, **kw)


def test_jsonl_plain_gz_zst(tmp_path, docs, spm_model):
    import zstandard

    write_jsonl(tmp_path / "a.jsonl", docs[:10])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs[10:20])
    raw = "".join(json.dumps({"body": d}) + "\n" for d in docs[20:30]).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    s1 = run([str(tmp_path / "a.jsonl")], tmp_path / "1", spm_model)
    check_roundtrip(s1, docs[:10], spm_model)
    s2 = run([str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.jsonl.zst")], tmp_path / "2", spm_model,
             text_field="body")
    check_roundtrip(s2, docs[10:30], spm_model)


def test_txt_directory_and_trained_tokenizer(tmp_path, docs):
    d = tmp_path / "txt" / "sub"
    d.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (d / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    s = preprocess([str(tmp_path / "txt")], str(tmp_path / "o" / "p"), vocab_size=400, valid_ratio=0.1)
    assert s["tokenizer"]["trained"] and os.path.isfile(s["tokenizer"]["model"])
    check_roundtrip(s, docs, s["tokenizer"]["model"])
    assert s["dtype"] == "uint16"
    summary = json.load(open(str(tmp_path / "o" / "p") + "_summary.json"))
    assert summary["tokenizer"]["sha256"] == s["tokenizer"]["sha256"] and summary["wall_time_s"] > 0


def test_openwebtext_layout_tar_of_xz(tmp_path, docs, spm_model):
    """OpenWebText: urlsf_subset*.xz are xz-compressed tars of .txt; also tars of .txt.xz."""
    def tar_bytes(members, mode="w"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    subsets = []
    for k in range(3):  # each subset: an xz-compressed tar of .txt documents
        members = [(f"{k:04d}-{i}.txt", d.encode()) for i, d in enumerate(docs[k * 8:(k + 1) * 8])]
        subsets.append((f"openwebtext/urlsf_subset00-{k}_data.xz", lzma.compress(tar_bytes(members))))
    (tmp_path / "openwebtext.tar").write_bytes(tar_bytes(subsets))
    # and a tar whose members are single .xz-compressed .txt documents
    (tmp_path / "docs.tar").write_bytes(tar_bytes([(f"d{i}.txt.xz", lzma.compress(d.encode()))
                                                   for i, d in enumerate(docs[24:])]))
    s = run([str(tmp_path / "openwebtext.tar"), str(tmp_path / "docs.tar")], tmp_path, spm_model)
    check_roundtrip(s, docs, spm_model)


def test_parquet_and_saved_dataset(tmp_path, docs, spm_model):
    import datasets

    ds = datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    check_roundtrip(run([str(tmp_path / "d.parquet")], tmp_path / "a", spm_model), docs, spm_model)
    check_roundtrip(run([str(tmp_path / "saved")], tmp_path / "b", spm_model), docs, spm_model)


def test_long_document_is_kept(tmp_path, docs, spm_model):
    long_doc = " ".join(["a fairly long line without breaks"] * 600)  # ~20 KB > 4192-byte limit
    long_doc += "\n" + "x" * 9000  # and a line with no whitespace at all
    path = write_jsonl(tmp_path / "l.jsonl", [long_doc] + docs[:3])
    s = preprocess([path], str(tmp_path / "o" / "p"), vocab_size=400, valid_ratio=0.0)
    check_roundtrip_any = sorted(Tokenizer(s["tokenizer"]["model"]).decode(x)
                                 for x in read_docs(s["outputs"]["train"], 1))
    assert s["documents"] == 4 and sorted([long_doc] + docs[:3]) == check_roundtrip_any


def test_workers_and_shards_do_not_change_output(tmp_path, spm_model):
    from mom_dist.data.corpus import write_default_corpus

    path = write_default_corpus(str(tmp_path), target_mb=0.6)
    outs = []
    for name, workers in (("w1", 1), ("w2", 2)):
        s = preprocess([path], str(tmp_path / name / "p"), tokenizer_model=spm_model, workers=workers,
                       shard_mb=0.1, valid_ratio=0.05)
        assert s["shards"] > 3
        outs.append({k: open(s["outputs"][sp] + k, "rb").read() for sp in ("train", "valid")
                     for k in (".bin", ".idx")})
    assert outs[0] == outs[1]


def test_uint16_and_int32_dtypes():
    from mom_dist.data.indexed import token_dtype

    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32
