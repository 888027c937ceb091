"""One mom-preprocess per output prefix, and a merge that checks every shard (issue 15).

Before, two runs on one prefix shared its work directory: the first exited 0 with documents
missing, `--verify` said OK and the summary claimed them all. Now the second real process
stops at once with one line naming the first (host, pid, start time), the first produces every
document; a lock left by a dead run is taken over; and a shard whose files disagree with its
record is never merged (exit 1, and the same command then redoes it).
"""
import json
import os
import socket
import subprocess
import sys
import time

from mom_dist.data.corpus import iter_records, write_default_corpus
from tests.data.test_preprocess_processes import start


def records(path):
    return sum(1 for _, r in iter_records([path]) if r.text is not None)


def verify(prefix):
    """What `mom-preprocess --verify` checks (sha256, ids, EOD, megatron reads it): the documents."""
    from mom_dist.data.indexed import verify

    return verify(prefix)["documents"]


def test_second_run_on_a_prefix_is_refused_naming_the_first(tmp_path, spm_model):
    corpus = write_default_corpus(str(tmp_path), target_mb=0.2)
    prefix = tmp_path / "o" / "p"
    args = [corpus, "--tokenizer-model", spm_model, "--shard-mb", "0.05", "-o", prefix, "--valid-ratio", "0.05"]
    env = dict(os.environ, MOM_PREPROCESS_TEST_SHARD_DELAY="3")  # 4 shards: the first run lasts ~12 s
    first = start(args, env=env)
    work = tmp_path / "o" / "p_work"
    deadline = time.time() + 60
    while time.time() < deadline and not (work.is_dir() and any(n.startswith("shard_") and n.endswith(".json")
                                                                 for n in os.listdir(work))):
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    for second_args in (args, args + ["--overwrite"], [*args[:-2], "--valid-ratio", "0.5"]):
        assert first.poll() is None
        second = start(second_args)
        out, err = second.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"mom-preprocess: error: output prefix '{prefix}' is in use by another "
                                   f"mom-preprocess (host {socket.gethostname()}, pid {first.pid}, started "), lines
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    summary = json.load(open(f"{prefix}_summary.json"))
    n = records(corpus)
    assert summary["documents"] == n and summary["train"]["documents"] + summary["valid"]["documents"] == n
    assert verify(f"{prefix}_train_text_document") + verify(f"{prefix}_valid_text_document") == n
    assert not os.path.exists(f"{prefix}_preprocess.lock") and not work.exists()


def test_lock_of_a_dead_run_is_taken_over(tmp_path, spm_model, docs):
    from tests.data.conftest import write_jsonl

    src = write_jsonl(tmp_path / "a.jsonl", docs[:10])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "o").mkdir()
    lock = tmp_path / "o" / "p_preprocess.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "pid_start": None,
                                "start": "earlier", "token": "0" * 16}))
    proc = start([src, "--tokenizer-model", spm_model, "-o", tmp_path / "o" / "p", "--valid-ratio", "0.2"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"removed the stale lock of a run that no longer exists (host {socket.gethostname()}, pid {gone.pid}" in err
    assert not lock.exists() and json.load(open(tmp_path / "o" / "p_summary.json"))["documents"] == 10


def test_a_shard_that_disagrees_with_its_record_is_not_merged(tmp_path, spm_model, docs):
    from tests.data.conftest import write_jsonl

    src = write_jsonl(tmp_path / "a.jsonl", docs)
    args = [src, "--tokenizer-model", spm_model, "--shard-mb", "0.002", "--valid-ratio", "0.2"]
    clean = start([*args, "-o", tmp_path / "clean" / "p"])
    assert clean.wait(timeout=120) == 0
    died = start([*args, "-o", tmp_path / "o" / "p"], env=dict(os.environ, MOM_PREPROCESS_TEST_DIE_AT="merge"))
    assert died.wait(timeout=120) == 9
    shard = tmp_path / "o" / "p_work" / "shard_000002.train.len"
    shard.write_bytes(shard.read_bytes()[:-4])  # one document fewer, as a second writer could leave it
    again = start([*args, "-o", tmp_path / "o" / "p"])
    out, err = again.communicate(timeout=120)
    assert "removed the stale lock" in err  # the killed run's
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("mom-preprocess: note:")]
    assert again.returncode == 1 and len(lines) == 1, err
    assert "shard 2 in" in lines[0] and "its train files hold" in lines[0], lines
    assert not (tmp_path / "o" / "p_train_text_document.bin").exists()
    fixed = start([*args, "-o", tmp_path / "o" / "p"])  # the same command redoes that shard
    out, err = fixed.communicate(timeout=120)
    assert fixed.returncode == 0, err
    for name in os.listdir(tmp_path / "clean"):
        if name.endswith((".bin", ".idx")):
            assert open(tmp_path / "o" / name, "rb").read() == open(tmp_path / "clean" / name, "rb").read(), name
