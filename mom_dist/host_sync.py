"""Counting operations that would block a GPU's host thread (device -> host syncs).

``count_host_syncs()`` is a ``TorchDispatchMode`` that counts the aten ops whose result size or
value must be read by the host (``_local_scalar_dense`` behind ``.item()``/``int()``,
``nonzero``, boolean indexing, ``bincount``, ``unique``, ..., and copies of host tensors to a
device, as ``torch.tensor(list, device=cuda)`` makes). ``Tensor.tolist()`` does not go
through the dispatcher, so code that needs values on the host calls ``to_host_list`` here,
which the counter also sees. Benchmarks and tests use it to prove the dispatch budget.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    "aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
    "aten.bincount.default", "aten._unique2.default", "aten.unique_dim.default",
    "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor", "aten.equal.default",
    "aten.is_nonzero.default",
}
_active: list["SyncCounter"] = []


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _SYNC_OPS or (name == "aten.index.Tensor" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))):
            self.ops[name] += 1
        elif name == "aten._to_copy.default" and args[0].device.type == "cpu" and \
                torch.device((kwargs or {}).get("device") or "cpu").type != "cpu":
            self.ops["host_to_device_copy"] += 1  # e.g. torch.tensor(list, device=cuda): a blocking copy
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    counter = SyncCounter()
    _active.append(counter)
    try:
        with counter:
            yield counter
    finally:
        _active.remove(counter)


def to_host_list(t: torch.Tensor) -> list:
    """``t.tolist()``: one device->host copy, recorded by any active ``count_host_syncs``."""
    for counter in _active:
        counter.ops["tolist"] += 1
    return t.tolist()
