"""A pickle planted in a data or index-cache folder never runs (issue 15, data directories).

megatron-core loads its GPTDataset index caches with ``numpy.load(allow_pickle=True)``. Here a
pickle whose unpickling creates a file is planted under every cache file's name: the library
refuses it with one line naming the file (nothing unpickled, nothing deleted), and ``mom-train``
keeps its cache under its own out_dir, so a pickle in the data folder is not even opened.
"""

import glob
import os
import pickle
import shutil

import numpy as np
import pytest

from mom_dist.data.index_cache import load_index_array
from mom_dist.data.indexed import DataIntegrityError
from mom_dist.data.loader import DataConfig, build_data_iterators, write_token_documents
from tests.parallel.test_checkpoint_safety import errors, mom_train, snapshot
from tests.payloads import CreatesFile

V = 64
KW = dict(vocab_size=V, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, train_samples=16,
          valid_samples=4)


def plant(paths, marker):
    for p in paths:
        with open(p, "wb") as f:
            pickle.dump(CreatesFile(str(marker)), f)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("valid", 20)):
        docs = [list(rng.integers(1, V, rng.integers(5, 30))) + [0] for _ in range(n)]
        write_token_documents(str(d / split), docs, V, eod=0)
    return d


def test_planted_pickles_in_the_cache_are_refused_and_never_unpickled(data, tmp_path):
    cache = tmp_path / "cache"
    cfg = DataConfig(train_prefixes=[str(data / "train")], valid_prefixes=[str(data / "valid")], seq_length=16,
                     cache_dir=str(cache))
    first = build_data_iterators(cfg, **KW)
    files = sorted(glob.glob(str(cache / "*.npy")))
    assert len(files) == 6 and not glob.glob(str(cache / ".building-*"))  # 3 per split, built in private
    marker = tmp_path / "pwned"
    for victim in files:
        saved = open(victim, "rb").read()
        plant([victim], marker)
        before = snapshot(cache)
        with pytest.raises(DataIntegrityError) as err:
            build_data_iterators(cfg, **KW)
        msg = str(err.value)
        assert "\n" not in msg and f"index cache file {victim} is not a plain .npy array" in msg
        assert "pickle" in msg and "delete it" in msg
        assert not marker.exists() and snapshot(cache) == before  # nothing run, nothing deleted
        with open(victim, "wb") as f:
            f.write(saved)
    again = build_data_iterators(cfg, **KW)  # restored: the cache is used as before
    assert np.array_equal(next(iter(first.train))["tokens"], next(iter(again.train))["tokens"])


@pytest.mark.parametrize("content,why", [
    (np.array([1, None], dtype=object), "pickle or Python objects"),
    ("npz", "an .npz archive"),
    (np.zeros((3, 2), dtype=np.int64), "2-d int64 array, not the 1-d integer index"),
    (np.zeros(3, dtype=np.float32), "1-d float32 array"),
    (b"\x93NUMPY\x01\x00", "plain .npy array"),  # a truncated header
])
def test_only_plain_integer_arrays_are_read(tmp_path, content, why):
    path = str(tmp_path / "x-document_index.npy")
    if isinstance(content, bytes):
        open(path, "wb").write(content)
    elif isinstance(content, str):
        with open(path, "wb") as f:
            np.savez(f, a=np.arange(3))
    else:
        np.save(path, content, allow_pickle=True)
    with pytest.raises(DataIntegrityError, match=why):
        load_index_array(path, 1)
    assert load_index_array(_saved(tmp_path, np.arange(5, dtype=np.int32)), 1).tolist() == [0, 1, 2, 3, 4]


def _saved(tmp_path, arr):
    path = str(tmp_path / "ok.npy")
    np.save(path, arr)
    return path


def test_mom_train_ignores_a_pickle_in_the_data_folder_and_refuses_one_in_its_cache(data, tmp_path):
    """Real mom-train runs: the default cache lives in out_dir, so pickles planted in the data
    folder (where megatron's default cache was) are never opened; a planted file in an explicit
    cache_dir stops the run with one line, exit 2, before anything is written."""
    data_dir = tmp_path / "data"
    shutil.copytree(data, data_dir)
    prefixes = f"train_prefixes: [{data_dir}/train], valid_prefixes: [{data_dir}/valid]"
    common = ("train.steps=2", "train.save_interval=0", "train.eval_batches=2")
    first = mom_train(tmp_path / "a", f"data={{{prefixes}}}", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    # A pickle under every cache name in the data folder: where megatron's default, and this
    # loader's default before, kept the cache (and under the names this run's cache has).
    marker = tmp_path / "pwned"
    os.makedirs(data_dir / "index_cache", exist_ok=True)
    ours = glob.glob(str(tmp_path / "a" / "index_cache" / "*.npy"))
    plant([str(data_dir / "index_cache" / os.path.basename(p)) for p in ours]
          + glob.glob(str(data_dir / "**" / "*.npy"), recursive=True), marker)
    second = mom_train(tmp_path / "b", f"data={{{prefixes}}}", *common)
    assert not marker.exists()
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(ours) == 6 and len(glob.glob(str(tmp_path / "b" / "index_cache" / "*.npy"))) == 6

    # An explicit cache_dir holding one planted file: refused, one line, exit 2, nothing written.
    cache = tmp_path / "a" / "index_cache"
    plant(sorted(glob.glob(str(cache / "*.npy")))[:1], marker)
    proc = mom_train(tmp_path / "c", f"data={{{prefixes}, cache_dir: {cache}}}", *common)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr[-3000:]
    (msg,) = errors(proc)
    assert "index cache file" in msg and "pickle" in msg, msg
    assert not (tmp_path / "c").exists()
