"""A damaged checkpoint is refused by every reader with one line naming the file and the previous
good checkpoint (issue 15): a truncated shard, flipped bits in a shard's tensor data or header,
in an RNG file or in ``mom_state.json``. Real ``mom-train`` / ``mom-convert`` / ``mom-eval``
processes; nothing is written, deleted or pruned. Checkpoints written before checksums existed
still load, with one info line at most; pruning never deletes the checkpoint a run resumed from
(the last one that verified).
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
import xxhash

from tests.dist_utils import ROOT, free_port, worker_env
from tests.parallel.test_checkpoint_safety import (ENV, cmd, copy_of, errors, good_run, latest, mom_train,  # noqa: F401
                                                   snapshot)

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pre_move_checkpoint", "run")


@pytest.fixture(scope="module")
def valid_data(tmp_path_factory):
    """An indexed dataset of the run's vocabulary, for mom-eval."""
    from mom_dist.data.loader import write_token_documents

    prefix = tmp_path_factory.mktemp("data") / "val"
    g = torch.Generator().manual_seed(0)
    write_token_documents(str(prefix), [torch.randint(1, 64, (40,), generator=g).tolist() for _ in range(4)], 64)
    return str(prefix)


def step_dir(run, step):
    return run / "checkpoints" / f"step{step:08d}"


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def flip_tensor_bit(path):
    """One flipped bit in the middle of a safetensors file's tensor data (the header intact)."""
    data = bytearray(open(path, "rb").read())
    (n,) = struct.unpack("<Q", data[:8])
    pos = 8 + n + (len(data) - 8 - n) // 2
    data[pos] ^= 0x10
    open(path, "wb").write(bytes(data))


def flip_header_bit(path):
    """'shapes' -> 'shaper' in the header's metadata: one bit."""
    data = open(path, "rb").read()
    assert data.count(b'"shapes"') == 1
    open(path, "wb").write(data.replace(b'"shapes"', b'"shaper"'))


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"mom_dist.cli.{module}", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def one_error_line(proc, tool):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith(f"{tool}: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def damaged(tmp_path, good_run, damage, file="state_rank00000.safetensors"):
    run = copy_of(good_run, tmp_path)
    path = step_dir(run, 2) / file
    damage(path)
    return run, path


def assert_names_file_and_previous(msg, path, run):
    assert f"'{path}'" in msg, msg
    assert f"previous good checkpoint is '{step_dir(run, 1)}'" in msg, msg


def test_truncated_shard_is_refused_by_every_reader(good_run, valid_data, tmp_path):
    run, path = damaged(tmp_path, good_run, truncate)
    before = snapshot(run)
    resume = mom_train(run, "train.steps=4")
    assert resume.returncode == 2, resume.stderr[-3000:]
    assert_names_file_and_previous(one_error_line(resume, "mom-train"), path, run)
    export = cli("convert", "export", run, "-o", tmp_path / "exp")
    assert export.returncode == 2
    assert_names_file_and_previous(one_error_line(export, "mom-convert"), path, run)
    evaluate = cli("evaluate", run, "--data", valid_data, "--seq-len", "16", "--no-progress")
    assert evaluate.returncode == 2 and evaluate.stdout == ""
    assert_names_file_and_previous(one_error_line(evaluate, "mom-eval"), path, run)
    init = mom_train(tmp_path / "new", f"train.init_from={run}")
    assert init.returncode == 2, init.stderr[-3000:]
    assert_names_file_and_previous(one_error_line(init, "mom-train"), path, run)
    assert snapshot(run) == before and not (tmp_path / "exp").exists()
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_flipped_tensor_bits_fail_the_checksum(good_run, valid_data, tmp_path):
    run, path = damaged(tmp_path, good_run, flip_tensor_bit)
    before = snapshot(run)
    resume = mom_train(run, "train.steps=4")
    assert resume.returncode == 2, resume.stderr[-3000:]
    msg = one_error_line(resume, "mom-train")
    assert_names_file_and_previous(msg, path, run)
    assert "checksum" in msg and "mom_state.json" in msg
    export = cli("convert", "export", run, "-o", tmp_path / "exp")
    assert export.returncode == 2
    assert_names_file_and_previous(one_error_line(export, "mom-convert"), path, run)
    evaluate = cli("evaluate", run, "--data", valid_data, "--seq-len", "16", "--no-progress")
    assert evaluate.returncode == 2
    assert_names_file_and_previous(one_error_line(evaluate, "mom-eval"), path, run)
    from mom_dist.checkpoint.sources import init_from_source, load_source
    from mom_dist.config import load_config
    from mom_dist.model import MoMModel
    from tests.parallel.test_checkpoint_safety import OVR

    model = MoMModel(load_config(os.path.join(ROOT, "configs/tiny.yaml"), OVR).model)
    with pytest.raises(ValueError, match="previous good checkpoint"):
        init_from_source(model, str(run))  # train.init_from
    with pytest.raises(ValueError, match="previous good checkpoint"):
        load_source(str(step_dir(run, 2)))  # a step directory, as every reader accepts
    assert snapshot(run) == before and not (tmp_path / "exp").exists()


def test_flipped_header_bit_is_one_line(good_run, tmp_path):
    run, path = damaged(tmp_path, good_run, flip_header_bit)
    export = cli("convert", "export", run, "-o", tmp_path / "exp")
    assert export.returncode == 2
    assert_names_file_and_previous(one_error_line(export, "mom-convert"), path, run)


def test_flipped_rng_file_and_state_file_are_refused(good_run, tmp_path):
    run, path = damaged(tmp_path, good_run, _flip_middle, file="rng_rank00000.pt")
    resume = mom_train(run, "train.steps=4")
    assert resume.returncode == 2, resume.stderr[-3000:]
    assert_names_file_and_previous(one_error_line(resume, "mom-train"), path, run)
    # mom_state.json: a digit of consumed_samples changed (still valid JSON) shifts the data stream
    shutil.copy(step_dir(good_run, 2) / "rng_rank00000.pt", path)
    state_path = step_dir(run, 2) / "mom_state.json"
    text = open(state_path).read()
    assert '"consumed_samples": 16' in text
    open(state_path, "w").write(text.replace('"consumed_samples": 16', '"consumed_samples": 17'))
    from mom_dist.checkpoint.consolidate import consolidate
    with pytest.raises(ValueError) as e:
        consolidate(str(run))
    assert_names_file_and_previous(str(e.value), state_path, run)


def _flip_middle(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_truncated_exported_model_is_one_line(good_run, tmp_path):
    """An exported directory's model.safetensors cut short: mom-convert to-hf says so in one line."""
    export = cli("convert", "export", good_run, "-o", tmp_path / "exp")
    assert export.returncode == 0, export.stderr[-3000:]
    truncate(tmp_path / "exp" / "model.safetensors")
    to_hf = cli("convert", "to-hf", tmp_path / "exp", "-o", tmp_path / "hf", "--no-tokenizer")
    assert to_hf.returncode == 2 and not (tmp_path / "hf").exists()
    assert f"'{tmp_path / 'exp' / 'model.safetensors'}' is damaged" in one_error_line(to_hf, "mom-convert")


def test_checksums_are_recorded_for_every_file_of_the_step(good_run):
    """XXH3-64 of each file's bytes (xxhash over the file read back here) and its size, in mom_state.json."""
    tag = step_dir(good_run, 2)
    state = json.load(open(tag / "mom_state.json"))
    names = sorted(f for f in os.listdir(tag) if f != "mom_state.json")
    assert names == ["rng_rank00000.pt", "state_rank00000.safetensors"]
    assert sorted(state["files"]) == names
    for name in names:
        data = open(tag / name, "rb").read()
        assert state["files"][name] == {"bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}


def test_pre_checksum_checkpoint_loads_quietly_and_damage_is_still_one_line(tmp_path):
    """tests/fixtures/pre_move_checkpoint has no checksums: it exports (one info line at most),
    and a truncated shard of it is still one line naming the file."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    export = cli("convert", "export", run, "-o", tmp_path / "exp")
    assert export.returncode == 0, export.stderr[-3000:]
    assert sum("checksum" in x for x in (export.stdout + export.stderr).splitlines()) <= 1
    path = step_dir(run, 2) / "state_rank00001.safetensors"
    truncate(path)
    export = cli("convert", "export", run, "-o", tmp_path / "exp2")
    assert export.returncode == 2
    msg = one_error_line(export, "mom-convert")
    assert f"'{path}'" in msg and "no earlier checkpoint" in msg, msg


def test_pruning_keeps_the_checkpoint_the_run_resumed_from(good_run, tmp_path):
    """keep_last=1 after a resume: step 2 (verified when loaded) stays until the run ends."""
    run = copy_of(good_run, tmp_path)
    proc = mom_train(run, "train.steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest(run) == "step00000005"
    kept = sorted(t for t in os.listdir(run / "checkpoints") if t.startswith("step"))
    assert kept == ["step00000002", "step00000004", "step00000005"], kept
    assert errors(proc) == []


def test_two_ranks_leave_together_when_one_finds_damage(tmp_path):
    """EP2 on 2 processes: the ranks share the verification (each hashes its share of the files);
    rank 1's damaged shard is found by one rank and refused by both, exit 2, no hang."""
    out = tmp_path / "run"

    def ranks(*extra):
        args, port = cmd(out, "parallel.ep_size=2", *extra), free_port()
        procs = [subprocess.Popen(args, cwd=ROOT, env=worker_env(r, 2, port), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(2)]
        return [p.communicate(timeout=300) + (p.returncode,) for p in procs]

    assert [r[2] for r in ranks("train.stop_after=2")] == [0, 0]
    path = step_dir(out, 2) / "state_rank00001.safetensors"
    flip_tensor_bit(path)
    before = snapshot(out)
    logs = ranks("train.steps=4")
    assert [r[2] for r in logs] == [2, 2], logs
    for _, err, _ in logs:
        (msg,) = [x for x in err.splitlines() if x.startswith("mom-train: error:")]
        assert_names_file_and_previous(msg, path, out)
        assert "Traceback" not in err
    assert snapshot(out) == before
