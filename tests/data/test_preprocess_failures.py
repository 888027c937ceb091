"""Issue 9: every failure of mom-preprocess is one line and exit 2, and never costs data.

Each test runs the real CLI entry point (in-process, `main(argv)`; the process-level ones in
test_preprocess_processes.py) and checks the message, the exit code, that the outputs of an
earlier run under the same prefix are byte-identical afterwards (sha256 of every file), and
that a rejected run leaves no work directory behind.
"""
import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile

import numpy as np
import pytest

import mom_dist.data.preprocess as pp
from mom_dist.cli.preprocess import main
from tests.data.conftest import write_jsonl


def snapshot(d):
    """{relative path: sha256} of every file below `d`."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def run_cli(capsys, *argv):
    code = main([*map(str, argv), "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.err


def assert_refused(code, err, *needles):
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("mom-preprocess: note:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mom-preprocess: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def prev(tmp_path, docs, spm_model):
    """A finished run under out/p, and the snapshot of out/ it left."""
    path = write_jsonl(tmp_path / "ok.jsonl", docs[:12])
    prefix = tmp_path / "out" / "p"
    pp.preprocess([path], str(prefix), tokenizer_model=spm_model, valid_ratio=0.2)
    return {"jsonl": path, "prefix": prefix, "dir": tmp_path / "out", "before": snapshot(tmp_path / "out")}


def intact(prev):
    assert snapshot(prev["dir"]) == prev["before"]
    assert not os.path.exists(str(prev["prefix"]) + "_work")
    assert not os.path.exists(str(prev["prefix"]) + "_work.trash")


def tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --------------------------------------------------------------------------- B1


def test_b1_lone_surrogate_is_skipped_and_counted(tmp_path, docs, capsys):
    path = tmp_path / "s.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"text": docs[0]}) + "\n")
        f.write('{"text": "x \\ud800 y"}\n')  # valid JSON, not valid Unicode
        for d in docs[1:10]:
            f.write(json.dumps({"text": d}) + "\n")
    # with tokenizer training (the surrogate crashed SentencePiece's trainer) and without
    code, err = run_cli(capsys, path, "-o", tmp_path / "a" / "p", "--vocab-size", "400", "--valid-ratio", "0")
    assert code == 0, err
    assert "skipped 1 records" in err and f"{path}:2 (invalid_utf8)" in err
    summary = json.load(open(tmp_path / "a" / "p_summary.json"))
    assert summary["documents"] == 10 and summary["skipped"] == {"invalid_utf8": 1}
    assert summary["skipped_examples"] == [{"where": f"{path}:2", "reason": "invalid_utf8"}]
    code, err = run_cli(capsys, path, "-o", tmp_path / "b" / "p", "--tokenizer-model",
                        tmp_path / "a" / "p_tokenizer.model", "--valid-ratio", "0")
    assert code == 0 and json.load(open(tmp_path / "b" / "p_summary.json"))["documents"] == 10


# --------------------------------------------------------------------------- B2 + B3


def _bad_inputs(tmp, docs):
    """(name, argv, expected message parts): inputs that must be refused with exit 2."""
    tmp.mkdir()
    good = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp / "garbage.model").write_bytes(b"not a sentencepiece model" * 10)
    (tmp / "garbage.jsonl.gz").write_bytes(b"this is not gzip at all" * 10)
    (tmp / "trunc.jsonl.gz").write_bytes(gzip.compress(good * 20)[:-200])
    (tmp / "garbage.jsonl.zst").write_bytes(b"this is not zstd either" * 10)
    owt = tar_bytes([(f"openwebtext/urlsf_subset00-{k}_data.xz",
                      lzma.compress(tar_bytes([(f"{k}-{i}.txt", d.encode()) for i, d in enumerate(docs)])))
                     for k in range(2)])
    full = lzma.compress(owt)
    (tmp / "openwebtext.tar.xz").write_bytes(full[:len(full) // 2])       # truncated outer .xz
    inner = lzma.compress(tar_bytes([(f"{i}.txt", d.encode()) for i, d in enumerate(docs)]))
    (tmp / "inner.tar").write_bytes(tar_bytes([("ok.txt", b"fine document"),
                                               ("urlsf_subset01-0_data.xz", inner[:len(inner) // 2])]))
    (tmp / "empty.jsonl").write_text("")
    (tmp / "invalid.jsonl").write_bytes(b"{broken\n" + b'{"text": "  "}\n')
    j = write_jsonl(tmp / "j.jsonl", docs)
    return [
        ("tokenizer", [j, "--tokenizer-model", tmp / "garbage.model"], ["garbage.model", "not a readable SentencePiece"]),
        ("gz-garbage", [tmp / "garbage.jsonl.gz"], ["garbage.jsonl.gz", "corrupt"]),
        ("gz-truncated", [tmp / "trunc.jsonl.gz"], ["trunc.jsonl.gz", "truncated at decompressed byte"]),
        ("zst-garbage", [tmp / "garbage.jsonl.zst"], ["garbage.jsonl.zst", "corrupt"]),
        ("xz-outer", [tmp / "openwebtext.tar.xz"], ["openwebtext.tar.xz", "truncated"]),
        ("xz-inner", [tmp / "inner.tar"], ["inner.tar", "urlsf_subset01-0_data.xz", "tar byte"]),
        ("empty-train", [tmp / "empty.jsonl"], ["no records"]),
        ("invalid-train", [tmp / "invalid.jsonl"], ["no usable documents", "malformed_json: 1", "invalid.jsonl:1"]),
    ]


def test_b2_b3_bad_inputs_refused_and_previous_outputs_intact(tmp_path, docs, prev, capsys):
    """B3: one line, exit 2; B2: with --overwrite, the previous outputs survive byte for byte."""
    for name, argv, needles in _bad_inputs(tmp_path / "in", docs[:20]):
        code, err = run_cli(capsys, *argv, "-o", prev["prefix"], "--overwrite", "--vocab-size", "400",
                            "--shard-mb", "0.001")
        assert_refused(code, err, *needles)
        intact(prev)
        # a fresh prefix: nothing at all is created
        code, err = run_cli(capsys, *argv, "-o", tmp_path / "fresh" / name / "p", "--vocab-size", "400")
        assert_refused(code, err, *needles)
        assert not (tmp_path / "fresh").exists(), name


# --------------------------------------------------------------------------- B4


def test_b4_rejected_run_leaves_nothing_so_the_fix_runs(tmp_path, docs, capsys):
    path = write_jsonl(tmp_path / "b.jsonl", docs[:10], field="body")
    out = tmp_path / "o"
    code, err = run_cli(capsys, path, "-o", out / "p", "--vocab-size", "400")  # default field "text"
    assert_refused(code, err, "missing_text_field: 10", "check --text-field (now 'text')")
    assert not out.exists()
    code, err = run_cli(capsys, path, "-o", out / "p", "--vocab-size", "100", "--text-field", "body")
    assert_refused(code, err, "vocab_size=100", "--vocab-size 300")
    assert not out.exists()
    code, err = run_cli(capsys, path, "-o", out / "p", "--vocab-size", "400", "--text-field", "body",
                        "--valid-ratio", "0")
    assert code == 0, err
    assert json.load(open(out / "p_summary.json"))["documents"] == 10


# --------------------------------------------------------------------------- B5


class Killed(BaseException):
    """Stands in for SIGKILL in-process: escapes every handler, so no cleanup code runs."""


def kill_at(monkeypatch, stage):
    def die(s):
        if s == stage:
            raise Killed(s)
    monkeypatch.setattr(pp, "_test_die", die)


def test_b5_resume_refuses_changed_inputs(tmp_path, docs, spm_model, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", docs[:20])
    argv = [path, "-o", tmp_path / "o" / "p", "--tokenizer-model", spm_model, "--shard-mb", "0.002"]
    kill_at(monkeypatch, "merge")
    with pytest.raises(Killed):
        run_cli(capsys, *argv)
    work = snapshot(tmp_path / "o")
    assert "p_work/settings.json" in work and not any(k.endswith(".bin") and "/" not in k for k in work)
    write_jsonl(path, docs[:24])  # the input changes between the kill and the rerun
    monkeypatch.undo()
    code, err = run_cli(capsys, *argv)
    assert_refused(code, err, "inputs changed since the interrupted run", "a.jsonl changed (size", "--overwrite")
    assert snapshot(tmp_path / "o") == work  # the interrupted work is kept (the inputs may be restored)
    code, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert json.load(open(tmp_path / "o" / "p_summary.json"))["documents"] == 24


# --------------------------------------------------------------------------- B6


def test_b6_no_empty_bin(tmp_path, docs, spm_model, prev, capsys):
    one = write_jsonl(tmp_path / "one.jsonl", docs[:1])
    code, err = run_cli(capsys, one, "-o", prev["prefix"], "--overwrite", "--tokenizer-model", spm_model)
    assert_refused(code, err, "train split would be empty", "--valid-ratio 0")
    intact(prev)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"other": 1}\n{"text": ""}\n')
    code, err = run_cli(capsys, bad, "-o", prev["prefix"], "--overwrite", "--tokenizer-model", spm_model)
    assert_refused(code, err, "no usable documents", "missing_text_field: 1", "empty_document: 1")
    intact(prev)
    # --valid-ratio 0: the deliberately empty valid split has no files, and the old ones go
    code, err = run_cli(capsys, one, "-o", prev["prefix"], "--overwrite", "--tokenizer-model", spm_model,
                        "--valid-ratio", "0")
    assert code == 0, err
    names = sorted(os.listdir(prev["dir"]))
    assert names == ["p_summary.json", "p_train_text_document.bin", "p_train_text_document.idx",
                     "p_train_text_document.meta.json"]
    summary = json.load(open(str(prev["prefix"]) + "_summary.json"))
    assert summary["valid"] is None and summary["outputs"]["valid"] is None and summary["documents"] == 1
    assert all(os.path.getsize(prev["dir"] / n) > 0 for n in names)


# --------------------------------------------------------------------------- B7


@pytest.mark.parametrize("stage", ["merge", "swap"])
def test_b7_killed_at_merge_or_swap_resumes_with_the_same_command(tmp_path, docs, spm_model, prev, capsys,
                                                                  monkeypatch, stage):
    path = write_jsonl(tmp_path / "new.jsonl", docs[5:30])
    argv = [path, "-o", prev["prefix"], "--overwrite", "--tokenizer-model", spm_model, "--shard-mb", "0.002"]
    clean = tmp_path / "clean" / "p"
    assert run_cli(capsys, *argv[:2], clean, *argv[4:])[0] == 0
    kill_at(monkeypatch, stage)
    with pytest.raises(Killed):
        run_cli(capsys, *argv)
    if stage == "merge":  # nothing under the prefix has changed yet
        assert {k: v for k, v in snapshot(prev["dir"]).items() if not k.startswith("p_work")} == prev["before"]
    monkeypatch.undo()
    code, err = run_cli(capsys, *argv)  # the same command
    assert code == 0, err
    assert not os.path.exists(str(prev["prefix"]) + "_work")
    for split in ("train", "valid"):
        for ext in (".bin", ".idx", ".meta.json"):
            a = open(f"{clean}_{split}_text_document{ext}", "rb").read()
            b = open(f"{prev['prefix']}_{split}_text_document{ext}", "rb").read()
            assert a == b, (split, ext)
    assert json.load(open(str(prev["prefix"]) + "_summary.json"))["documents"] == 25


# --------------------------------------------------------------------------- loader: random .bin


def test_random_bin_of_the_right_size_is_refused(tmp_path, docs, spm_model, capsys):
    from mom_dist.data.indexed import DataIntegrityError
    from mom_dist.data.loader import DataConfig, check_data

    s = pp.preprocess([write_jsonl(tmp_path / "a.jsonl", docs)], str(tmp_path / "p"),
                      tokenizer_model=spm_model, valid_ratio=0.0)
    prefix = s["outputs"]["train"]
    cfg = DataConfig(train_prefixes=[prefix], split="1", seq_length=8, tokenizer_model=spm_model)
    check_data(cfg, vocab_size=512)  # the real data passes
    size = os.path.getsize(prefix + ".bin")
    rng = np.random.default_rng(0)
    for name, data in (("any bytes", rng.integers(0, 256, size, dtype=np.uint8).tobytes()),
                       # ids all inside the vocab: only the document ends give it away
                       ("in-vocab ids", rng.integers(2, 400, size // 2, dtype=np.uint16).tobytes())):
        with open(prefix + ".bin", "wb") as f:
            f.write(data)
        with pytest.raises(DataIntegrityError, match="rebuild"):
            check_data(cfg, vocab_size=512)
        code, err = run_cli(capsys, "--verify", prefix)
        assert_refused(code, err, "does not match the sha256", "rebuild")


# --------------------------------------------------------------------------- tokenizer identity


def test_tokenizer_identity_is_its_vocabulary(tmp_path, docs, spm_model):
    from mom_dist.data.loader import DataConfig, check_data
    from mom_dist.data.tokenizer import Tokenizer, train_tokenizer

    text = docs * 3
    a = train_tokenizer(iter(text), str(tmp_path / "first"), vocab_size=400)
    b = train_tokenizer(iter(text), str(tmp_path / "other_name"), vocab_size=400)
    ta, tb = Tokenizer(a), Tokenizer(b)
    assert ta.sha256 != tb.sha256  # SentencePiece stores model_prefix in the file ...
    assert ta.identity == tb.identity  # ... but the vocabulary is the same
    assert Tokenizer(spm_model).identity != ta.identity
    s = pp.preprocess([write_jsonl(tmp_path / "a.jsonl", docs)], str(tmp_path / "p"), tokenizer_model=a,
                      valid_ratio=0.0)
    ok = DataConfig(train_prefixes=[s["outputs"]["train"]], split="1", seq_length=8, tokenizer_model=b)
    check_data(ok, vocab_size=512)
    bad = DataConfig(train_prefixes=[s["outputs"]["train"]], split="1", seq_length=8, tokenizer_model=spm_model)
    with pytest.raises(ValueError, match="another tokenizer .*vocabulary differs"):
        check_data(bad, vocab_size=512)


# --------------------------------------------------------------------------- configs


def test_configs_point_at_what_preprocess_writes(tmp_path, docs, monkeypatch):
    """Every shipped config's data paths are the names `mom-preprocess -o PREFIX` writes, and
    data made that way passes the loader's checks with the config as written."""
    import glob

    import yaml

    from mom_dist.data.loader import DataConfig, check_data

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    configs = {}
    for path in sorted(glob.glob(os.path.join(root, "configs", "*.yaml"))):
        data = (yaml.safe_load(open(path)) or {}).get("data") or {}
        if "train_prefixes" in data:
            configs[os.path.basename(path)] = data
    assert len(configs) >= 8
    prefixes = set()
    for name, data in configs.items():
        train = data["train_prefixes"][0]
        assert train.endswith("_train_text_document"), name
        prefix = train[: -len("_train_text_document")]
        want = pp.output_paths(prefix)
        assert data["tokenizer_model"] == want["tokenizer"], name
        assert data.get("valid_prefixes") == [want["valid"]], name
        prefixes.add(prefix)
    monkeypatch.chdir(tmp_path)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    for prefix in sorted(prefixes):
        pp.preprocess([src], prefix, vocab_size=400, valid_ratio=0.1)
    for name, data in configs.items():
        check_data(DataConfig.from_dict(data), vocab_size=512)


# --------------------------------------------------------------------------- input order (docs)


def test_folder_order_and_ignored_files_are_reported(tmp_path, docs, spm_model, capsys):
    d = tmp_path / "f"
    (d / "a").mkdir(parents=True)
    for rel, text in (("b.txt", "third"), ("a/b.txt", "second"), ("a.txt", "first")):
        (d / rel).write_text(text + " document")
    (d / "README.md").write_text("# not read")
    (d / "a" / "table.csv").write_text("x,y")
    code, err = run_cli(capsys, d, "-o", tmp_path / "o" / "p", "--tokenizer-model", spm_model,
                        "--valid-ratio", "0")
    assert code == 0, err
    assert "ignoring 2 file(s) of other kinds" in err and ".md: 1" in err and ".csv: 1" in err
    from mom_dist.data.corpus import check_inputs

    assert [os.path.relpath(f, d) for f in check_inputs([str(d)])] == ["a.txt", "a/b.txt", "b.txt"]
