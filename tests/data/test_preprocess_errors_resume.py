"""Bad inputs are counted or stop cleanly; an interrupted run resumes to identical bytes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mom_dist.data.corpus import InputError
from mom_dist.data.preprocess import OutputExistsError, preprocess
from tests.data.conftest import ROOT, write_jsonl


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess.py"), *args],
                          capture_output=True, text=True, env=env, **kw)


def test_bad_records_are_counted_not_fatal(tmp_path, docs, spm_model):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"text": docs[0]}).encode() + b"\n")
        f.write(b'{"text": "unterminated\n')                       # malformed JSON
        f.write(b'{"text": "bad \xff\xfe bytes"}\n')                # invalid UTF-8
        f.write(b'{"text": "   "}\n')                               # empty document
        f.write(b'{"other": "no text field"}\n')                    # missing field
        f.write(json.dumps({"text": docs[1]}).encode() + b"\n")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes(b"caf\xe9 latin-1, not utf-8")
    (tmp_path / "txt" / "b.txt").write_text("")
    s = preprocess([str(path), str(tmp_path / "txt")], str(tmp_path / "o" / "p"),
                   tokenizer_model=spm_model, valid_ratio=0.0)
    assert s["documents"] == 2 and s["records_read"] == 8
    assert s["skipped"] == {"empty_document": 2, "invalid_utf8": 2, "malformed_json": 1,
                            "missing_text_field": 1}
    assert any(e["where"].endswith("bad.jsonl:2") and e["reason"] == "malformed_json"
               for e in s["skipped_examples"])


def test_missing_input_touches_nothing(tmp_path):
    r = cli(str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out" / "p"))
    assert r.returncode == 2 and "input not found" in r.stderr and "nope.jsonl" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_archive_touches_nothing(tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file" * 100)
    (tmp_path / "urlsf_subset00-1_data.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    for name in ("broken.tar", "urlsf_subset00-1_data.xz"):
        r = cli(str(tmp_path / name), "-o", str(tmp_path / "out" / "p"))
        assert r.returncode == 2 and name in r.stderr
        assert "cannot read archive" in r.stderr or "truncated" in r.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, docs, spm_model):
    path = write_jsonl(tmp_path / "a.jsonl", docs[:5])
    prefix = str(tmp_path / "p")
    preprocess([path], prefix, tokenizer_model=spm_model)
    before = {n: os.path.getmtime(tmp_path / n) for n in os.listdir(tmp_path)}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        preprocess([path], prefix, tokenizer_model=spm_model, seed=5)
    r = cli(path, "-o", prefix, "--tokenizer-model", spm_model, "--seed", "5")
    assert r.returncode == 2 and "already has results" in r.stderr
    r = cli(path, "-o", prefix, "--tokenizer-model", spm_model)  # the same command again: done already
    assert r.returncode == 0 and "already complete" in r.stderr
    assert before == {n: os.path.getmtime(tmp_path / n) for n in os.listdir(tmp_path)}
    assert preprocess([path], prefix, tokenizer_model=spm_model, overwrite=True)["documents"] == 5
    with pytest.raises(InputError, match="tokenizer model"):
        preprocess([path], str(tmp_path / "q"), tokenizer_model=str(tmp_path / "missing.model"))


def test_verify_cli_and_truncation(tmp_path, docs, spm_model):
    path = write_jsonl(tmp_path / "a.jsonl", docs[:8])
    s = preprocess([path], str(tmp_path / "p"), tokenizer_model=spm_model, valid_ratio=0.0)
    r = cli("--verify", s["outputs"]["train"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["documents"] == 8 and report["samples"][0]["text"].startswith("Document 0")
    with open(s["outputs"]["train"] + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(s["outputs"]["train"] + ".bin") - 10)
    r = cli("--verify", s["outputs"]["train"])
    assert r.returncode == 2 and "truncated" in r.stderr


def test_kill_and_resume_is_byte_identical(tmp_path):
    from mom_dist.data.corpus import write_default_corpus

    corpus = write_default_corpus(str(tmp_path), target_mb=0.4)
    common = [corpus, "--vocab-size", "400", "--shard-mb", "0.05", "--workers", "2",
              "--valid-ratio", "0.05", "--no-progress"]
    clean = cli(*common, "-o", str(tmp_path / "clean" / "p"))
    assert clean.returncode == 0, clean.stderr

    env = dict(os.environ, MOM_PREPROCESS_TEST_SHARD_DELAY="0.3")
    prefix = tmp_path / "killed" / "p"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess.py"), *common,
                             "-o", str(prefix)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = str(prefix) + "_work"
    deadline = time.time() + 60
    while time.time() < deadline:
        done = [n for n in os.listdir(work) if n.endswith(".json") and n.startswith("shard_")] \
            if os.path.isdir(work) else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the tool and its workers, mid-run
    proc.wait()
    assert not os.path.exists(str(prefix) + "_train_text_document.bin")
    resumed = cli(*common, "-o", str(prefix))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.load(open(str(prefix) + "_summary.json"))
    assert summary["resumed_shards"] >= 2 and summary["shards"] > summary["resumed_shards"]
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            a = open(str(tmp_path / "clean" / "p") + f"_{split}_text_document{ext}", "rb").read()
            b = open(str(prefix) + f"_{split}_text_document{ext}", "rb").read()
            assert a == b, (split, ext)
    # same pieces (the .model files differ only in the training path stored in them)
    import sentencepiece as spm

    pieces = [[sp.id_to_piece(i) for i in range(sp.vocab_size())]
              for sp in (spm.SentencePieceProcessor(model_file=str(p) + "_tokenizer.model")
                         for p in (tmp_path / "clean" / "p", prefix))]
    assert pieces[0] == pieces[1]


def test_dangling_symlink_is_named_with_its_target(tmp_path, docs):
    """Issue 15: a dangling link was reported as "not readable; fix its permissions"."""
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", docs[:3])
    os.symlink(tmp_path / "moved" / "b.jsonl", d / "b.jsonl")
    os.symlink("c.jsonl", tmp_path / "loop.jsonl")
    os.symlink("loop.jsonl", tmp_path / "c.jsonl")
    for inp, target in ((d, tmp_path / "moved" / "b.jsonl"), (d / "b.jsonl", tmp_path / "moved" / "b.jsonl"),
                        (tmp_path / "loop.jsonl", "c.jsonl")):
        r = cli(str(inp), "-o", str(tmp_path / "out" / "p"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("mom-preprocess: error: "), r.stderr
        assert "permissions" not in lines[0] and f"points to '{target}'" in lines[0], lines[0]
        assert ("a dangling symlink" if "moved" in str(target) else "a symlink loop") in lines[0], lines[0]
        assert "fix or remove the link" in lines[0]
    assert not (tmp_path / "out").exists()
