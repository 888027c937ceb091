"""Reading checkpoint files without running code from them, and the per-rank RNG files.

A ``.pt`` file is a pickle: loading it with ``torch.load(weights_only=False)`` can execute
anything its author put in it. Every read of ours goes through ``load_plain`` (``weights_only=
True``: tensors, numbers, strings, lists, dicts, plus the three plain DeepSpeed types below).
DeepSpeed's own loader unpickles its files fully; before the trainer hands a checkpoint to it,
``verify_plain`` reads every ``.pt`` file of that checkpoint the safe way, so a file that would
run code is refused before DeepSpeed sees it - and DeepSpeed only ever loads from the run's own
``out_dir``.

RNG files (``rng_rank00003.pt``) hold plain tensors: torch's CPU (and CUDA) generator state and
Python's ``random`` state as an int64 tensor.
"""

from __future__ import annotations

import os
import pickle
import random

import torch


def _deepspeed_plain_types() -> list:
    """Types DeepSpeed 0.19 pickles into its ZeRO optimizer files: data only (a loss-scale
    record, a dataclass of two ints, an enum)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]


class UnsafeCheckpointFile(ValueError):
    """A checkpoint file that is not plain data (loading it could run code)."""


def load_plain(path: str, map_location="cpu"):
    """``torch.load`` that refuses anything but plain data, with a one-line reason."""
    try:
        with torch.serialization.safe_globals(_deepspeed_plain_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        reason = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UnsafeCheckpointFile(
            f"refusing to load '{path}': it is not plain tensor data and loading it could run code "
            f"({reason[:160]}); only load checkpoints you wrote yourself") from None


def verify_plain(tag_dir: str, rank: int = 0, world_size: int = 1) -> None:
    """Check every ``.pt`` file under ``tag_dir`` loads as plain data (rank r takes every
    world_size-th file, so each file is read once per job); raise on this rank's first bad file."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(tag_dir) for f in names if f.endswith(".pt"))
    for path in files[rank::world_size]:
        load_plain(path)


def save_rng(path: str) -> None:
    version, state, gauss = random.getstate()
    rng = {"torch": torch.get_rng_state(), "python_version": torch.tensor(version),
           "python_state": torch.tensor(state, dtype=torch.int64),
           "python_gauss": torch.tensor(float("nan") if gauss is None else gauss, dtype=torch.float64)}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path)


def load_rng(path: str) -> None:
    rng = load_plain(path)
    torch.set_rng_state(rng["torch"])
    if "python_state" in rng:
        gauss = float(rng["python_gauss"])
        random.setstate((int(rng["python_version"]), tuple(int(x) for x in rng["python_state"].tolist()),
                         None if gauss != gauss else gauss))
    else:  # written before the plain-tensor format: {"torch": ..., "python": (version, state, gauss)}
        random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
