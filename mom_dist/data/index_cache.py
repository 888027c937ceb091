"""megatron-core's GPTDataset with index caches that can never run code.

megatron-core 0.16 saves each GPTDataset's document/sample/shuffle indices as `.npy` files in
`path_to_cache` and loads them back with `numpy.load(..., allow_pickle=True)`. numpy unpickles
any file that is not an `.npy`/`.npz`, so a pickle planted under a cache file's name (anyone
who can write the cache folder, often the shared data folder) runs its code in every rank of
the next run. `CheckedGPTDataset` keeps megatron's index building and cache names but:

- loads a cache hit itself, with `allow_pickle=False`, and accepts only a plain integer array
  of the expected rank; anything else (a pickle, an object array, an `.npz`, a damaged file)
  is refused with one line naming the file and the fix (`DataIntegrityError`, exit 2), and
  nothing is read from it;
- on a miss, lets megatron build into a fresh private folder (`mkdtemp`, so megatron's own
  pickle-capable load path never finds a file there) and moves the finished files into the
  cache with `os.replace`, the description last: a kill half-way leaves no half-written file
  under a cache name, and the next run rebuilds.

The BlendedDataset over several prefixes is built in memory (`path_to_cache=None`) by the
loader, so megatron never reads a blend cache either. The `.bin/.idx` files themselves are
read with struct and memmap (`indexed.read_index`, megatron's IndexedDataset), never pickle.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset

from mom_dist.data.indexed import DataIntegrityError

# (file suffix, expected ndim) in the order megatron returns them.
_INDEX_FILES = (("document_index.npy", 1), ("sample_index.npy", 2), ("shuffle_index.npy", 1))
_DESCRIPTION = "description.txt"


def load_index_array(path: str, ndim: int) -> np.ndarray:
    """Memory-map one cached index; refuse anything but a plain integer array of rank `ndim`."""
    fix = (f"delete it (the loader rebuilds it) and check who can write to {os.path.dirname(path)}; "
           "mom_dist never loads pickles from a data or cache folder")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        why = "it holds a pickle or Python objects" if "pickle" in str(err) or "objects" in str(err) else str(err)
        raise DataIntegrityError(f"index cache file {path} is not a plain .npy array ({why}); {fix}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive under a .npy name
        close = getattr(arr, "close", None)
        if close:
            close()
        raise DataIntegrityError(f"index cache file {path} is not a plain .npy array (an .npz archive); {fix}")
    if arr.dtype.kind not in "iu" or arr.ndim != ndim:
        raise DataIntegrityError(f"index cache file {path} holds a {arr.ndim}-d {arr.dtype} array, not the "
                                 f"{ndim}-d integer index the loader writes; {fix}")
    return arr


class CheckedGPTDataset(GPTDataset):
    """GPTDataset whose index cache is read without pickle and written atomically (module doc)."""

    def _build_document_sample_shuffle_indices(self):
        cfg = self.config
        cache = cfg.path_to_cache
        if not cache or cfg.defer_npy_index_mmap or cfg.fast_cache_load:
            # These modes load caches lazily through megatron's own numpy.load: never used here.
            raise ValueError("CheckedGPTDataset needs path_to_cache set, without defer_npy_index_mmap "
                             "and fast_cache_load")
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        final = {name: os.path.join(cache, f"{base}-{name}") for name, _ in _INDEX_FILES}
        final[_DESCRIPTION] = os.path.join(cache, f"{base}-{_DESCRIPTION}")
        if all(os.path.isfile(p) for p in final.values()):
            return tuple(load_index_array(final[name], ndim) for name, ndim in _INDEX_FILES)
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            # megatron builds on global rank 0 only (the loader has it build first); a miss here
            # means this rank sees another folder than rank 0 did.
            raise RuntimeError(f"rank {dist.get_rank()} finds no index cache for {self.dataset_path} in "
                               f"{cache} after rank 0 built it; use a cache_dir every rank sees")
        os.makedirs(cache, exist_ok=True)
        private = tempfile.mkdtemp(prefix=".building-", dir=cache)
        try:
            self.config = copy.copy(cfg)  # a copy: the builder shares `cfg` between datasets
            self.config.path_to_cache = private
            built = super()._build_document_sample_shuffle_indices()
            for name in [n for n, _ in _INDEX_FILES] + [_DESCRIPTION]:  # description last = complete
                os.replace(os.path.join(private, f"{base}-{name}"), final[name])
        finally:
            self.config = cfg
            shutil.rmtree(private, ignore_errors=True)
        return built
