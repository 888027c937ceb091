"""Reading checkpoint files without running code from them, and the per-rank RNG files.

A ``.pt`` file is a pickle: loading it with ``torch.load(weights_only=False)`` can execute
anything its author put in it. Every read of ours goes through ``load_plain``: the globals the pickle names are listed
without executing it (anything but the three plain DeepSpeed types below is refused, naming
it), then ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts) reads it.
DeepSpeed's own loader unpickles its files fully; before the trainer hands a checkpoint to it,
``verify_plain`` reads every ``.pt`` file of that checkpoint the safe way (``verify_plain_all``:
each rank a share, all learning the first problem), so a file that would run code is refused
before DeepSpeed sees it - and DeepSpeed only ever loads from the run's own ``out_dir``.

RNG files (``rng_rank00003.pt``) hold plain tensors: torch's CPU (and CUDA) generator state and
Python's ``random`` state as an int64 tensor. ``save_rng`` returns the file's size and checksum,
hashed from the bytes it wrote (``integrity``). A file torch cannot read (truncated, flipped
bits in its zip structure) is a ``DamagedCheckpoint``: one line naming it.
"""

from __future__ import annotations

import io
import os
import pickle
import random

import torch

from mom_dist.checkpoint.integrity import first_error_everywhere, record_of_bytes
from mom_dist.checkpoint.layout import DamagedCheckpoint


# Types DeepSpeed 0.19 pickles into its ZeRO optimizer files: data only (a loss-scale record,
# a dataclass of two ints, an enum). Imported only when a file names them (importing DeepSpeed
# prints to stdout, which a command like mom-eval keeps for its JSON).
DEEPSPEED_PLAIN_TYPES = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    "deepspeed.runtime.zero.config.ZeroStageEnum": ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    "deepspeed.utils.tensor_fragment.fragment_address": ("deepspeed.utils.tensor_fragment", "fragment_address"),
}


class UnsafeCheckpointFile(ValueError):
    """A checkpoint file that is not plain data (loading it could run code)."""


def _refuse(path: str, what: str):
    raise UnsafeCheckpointFile(f"refusing to load '{path}': it is not plain tensor data and loading it could run "
                               f"code ({what[:160]}); only load checkpoints you wrote yourself") from None


def load_plain(path: str, map_location="cpu"):
    """``torch.load`` that refuses anything but plain data, with a one-line reason."""
    import importlib

    try:  # reads the pickle's opcodes without executing any
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: torch.load below refuses or reads it
        named = []
    foreign = [g for g in named if g not in DEEPSPEED_PLAIN_TYPES]
    if foreign:
        _refuse(path, "it names " + ", ".join(foreign[:3]))
    allowed = [getattr(importlib.import_module(DEEPSPEED_PLAIN_TYPES[g][0]), DEEPSPEED_PLAIN_TYPES[g][1])
               for g in named]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        _refuse(path, next((x.strip() for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0] if lines else ""))
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        # torch's zip reader: "PytorchStreamReader failed reading zip archive ..." (truncated),
        # a damaged pickle inside: whatever the unpickler trips over
        text = str(e).strip()
        why = text.splitlines()[0][:200] if text else type(e).__name__
        raise DamagedCheckpoint(path, f"torch cannot read it: {why}") from None


def verify_plain(tag_dir: str, rank: int = 0, world_size: int = 1) -> None:
    """Check every ``.pt`` file under ``tag_dir`` loads as plain data (rank r takes every
    world_size-th file, so each file is read once per job); raise on this rank's first bad file."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(tag_dir) for f in names if f.endswith(".pt"))
    for path in files[rank::world_size]:
        load_plain(path)


def verify_plain_all(tag_dir: str, rank: int, world_size: int) -> None:
    """``verify_plain`` shared by the ranks (a collective when distributed): every rank raises
    the first problem any rank found."""
    first_error_everywhere(lambda: verify_plain(tag_dir, rank, world_size))


def save_rng(path: str) -> dict:
    """Write this process's RNG state; returns the file's record (bytes, checksum)."""
    version, state, gauss = random.getstate()
    rng = {"torch": torch.get_rng_state(), "python_version": torch.tensor(version),
           "python_state": torch.tensor(state, dtype=torch.int64),
           "python_gauss": torch.tensor(float("nan") if gauss is None else gauss, dtype=torch.float64)}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(rng, buf)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return record_of_bytes(data)


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
