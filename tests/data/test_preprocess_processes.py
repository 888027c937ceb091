"""No process outlives mom-preprocess: after success, after a bad input found mid-stream while
workers run, and after SIGKILL of the main process alone (the workers must notice).

Each run starts the real CLI (`tools/preprocess.py`, --workers 2) in its own session, so every
process it spawns (workers, multiprocessing's resource tracker) shares that session id, and
the test lists the session's survivors with psutil. Run under `heavy` (several processes).
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.data.conftest import ROOT


def session_procs(sid):
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    return out


def wait_gone(sid, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = session_procs(sid)
        if not left:
            return []
        time.sleep(0.1)
    return [" ".join(p.cmdline()[-3:]) for p in session_procs(sid)]


def start(args, env=None):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess.py"), *map(str, args),
                             "--no-progress"], start_new_session=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_no_orphan_workers(tmp_path, spm_model):
    from mom_dist.data.corpus import write_default_corpus

    corpus = write_default_corpus(str(tmp_path), target_mb=0.3)
    common = [corpus, "--tokenizer-model", spm_model, "--workers", "2", "--shard-mb", "0.02"]

    # 1. success
    proc = start([*common, "-o", tmp_path / "a" / "p"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert wait_gone(proc.pid, 2) == []

    # 2. corrupt input found mid-stream while workers are busy: one line, exit 2, no survivors
    import gzip

    data = gzip.compress(open(corpus, "rb").read())
    (tmp_path / "late.jsonl.gz").write_bytes(data[: len(data) - 300])  # truncated near the end
    env = dict(os.environ, MOM_PREPROCESS_TEST_SHARD_DELAY="0.2")
    proc = start([tmp_path / "late.jsonl.gz", *common[1:], "-o", tmp_path / "b" / "p"], env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().startswith("mom-preprocess: error: ") and "late.jsonl.gz" in err
    assert len(err.strip().splitlines()) == 1, err
    assert wait_gone(proc.pid, 2) == []
    assert not (tmp_path / "b").exists()

    # 3. SIGKILL of the main process only: the workers exit on their own
    proc = start([*common, "-o", tmp_path / "c" / "p"], env=env)
    work = tmp_path / "c" / "p_work"
    deadline = time.time() + 60
    while time.time() < deadline and not (work.is_dir() and any(n.endswith(".json") and n.startswith("shard_")
                                                               for n in os.listdir(work))):
        time.sleep(0.05)
    workers = [p for p in session_procs(proc.pid) if p.pid != proc.pid]
    assert workers, "the workers should be running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_gone(proc.pid, 5) == []
    # and the same command resumes to the same bytes as the successful run
    proc = start([*common, "-o", tmp_path / "c" / "p"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.load(open(tmp_path / "c" / "p_summary.json"))["resumed_shards"] >= 1
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            a = open(tmp_path / "a" / f"p_{split}_text_document{ext}", "rb").read()
            assert a == open(tmp_path / "c" / f"p_{split}_text_document{ext}", "rb").read()
    assert wait_gone(proc.pid, 2) == []



def test_abrupt_exit_during_swap_is_finished_by_the_same_command(tmp_path, spm_model, docs):
    """B7 with a real abrupt exit (os._exit, no cleanup) after the first output file is swapped in."""
    from tests.data.conftest import write_jsonl

    src = write_jsonl(tmp_path / "a.jsonl", docs)
    args = [src, "--tokenizer-model", spm_model, "--valid-ratio", "0.2"]
    clean = start([*args, "-o", tmp_path / "clean" / "p"])
    assert clean.wait(timeout=120) == 0
    env = dict(os.environ, MOM_PREPROCESS_TEST_DIE_AT="swap")
    died = start([*args, "-o", tmp_path / "o" / "p"], env=env)
    assert died.wait(timeout=120) == 9
    assert os.path.exists(tmp_path / "o" / "p_work" / "commit.json")
    again = start([*args, "-o", tmp_path / "o" / "p"])
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert sorted(os.listdir(tmp_path / "o")) == sorted(os.listdir(tmp_path / "clean"))
    for name in os.listdir(tmp_path / "clean"):
        if name.endswith((".bin", ".idx", ".meta.json")):
            assert open(tmp_path / "o" / name, "rb").read() == open(tmp_path / "clean" / name, "rb").read(), name
