"""Training data: megatron-core GPTDataset blends -> deterministic, resumable micro-batches.

Ordering contract (the trainer relies on it; numbers must not depend on the DP layout):

    G = global_batch_size, b = micro_batch_size, D = dp_size, M = G // (b * D)
    global step i covers samples  c + i*G ... c + (i+1)*G - 1      (c = consumed_samples)
    rank r's micro-batch j (0 <= j < M) of step i holds samples
        c + i*G + (j*D + r)*b ... + b - 1

So micro-batch number k = j*D + r of a global batch holds the same samples for any D: a
single process with M*D accumulation steps sees exactly the micro-batches a D-rank run
sees, and resuming from `consumed_samples` continues mid-epoch with the same samples.
"Sample n" is entry n of the seeded sample order of megatron's GPTDataset (or of the
BlendedDataset over several prefixes).

Each micro-batch is a dict of CPU tensors:
    tokens (b, s) long, labels (b, s) long, loss_mask (b, s) float, position_ids (b, s) long,
    attention_mask (b, 1, s, s) bool, True = masked (only when reset_attention_mask is on).

The pieces: `DataConfig` (`data_config.py`), the checks before training (`data_checks.py`:
`check_data`, and `write_token_documents` for tests and tools), the megatron datasets and their
index caches on every rank (`megatron_datasets.py`, `index_cache.py`); all importable from here.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

from mom_dist.data.data_checks import check_data, write_token_documents  # noqa: F401  (public here)
from mom_dist.data.data_config import DataConfig
from mom_dist.data.megatron_datasets import build_datasets


_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _collate(samples: list, with_mask: bool) -> dict:
    import torch

    batch = {k: torch.stack([s[k] for s in samples]) for k in _KEYS}
    if with_mask:
        batch["attention_mask"] = torch.stack([s["attention_mask"] for s in samples])  # (b, 1, s, s)
    return batch


def micro_batch_indices(step: int, j: int, *, consumed_samples: int, global_batch_size: int,
                        micro_batch_size: int, dp_rank: int, dp_size: int) -> range:
    """Sample numbers of rank `dp_rank`'s micro-batch `j` in global step `step` (module doc)."""
    start = consumed_samples + step * global_batch_size + (j * dp_size + dp_rank) * micro_batch_size
    return range(start, start + micro_batch_size)


class MicroBatchIterator:
    """Yields this rank's micro-batches for global steps until `end_sample` is reached.

    `state_dict()` gives the consumed-samples count to resume from (whole global steps).
    """

    def __init__(self, dataset, *, start_sample: int, end_sample: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, with_mask: bool):
        self.dataset, self.end = dataset, end_sample
        self.G, self.b, self.r, self.D = global_batch_size, micro_batch_size, dp_rank, dp_size
        self.M = global_batch_size // (micro_batch_size * dp_size)
        self.consumed = start_sample
        self.j = 0
        self.with_mask = with_mask

    @property
    def micro_batches_per_step(self) -> int:
        return self.M

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.consumed + self.G > self.end:
            raise StopIteration
        rows = micro_batch_indices(0, self.j, consumed_samples=self.consumed, global_batch_size=self.G,
                                   micro_batch_size=self.b, dp_rank=self.r, dp_size=self.D)
        batch = _collate([self.dataset[i] for i in rows], self.with_mask)
        self.j += 1
        if self.j == self.M:  # global step done on this rank
            self.j = 0
            self.consumed += self.G
        return batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed}


class ValidBatches:
    """Re-iterable: each `iter()` yields this rank's micro-batches of the first valid samples."""

    def __init__(self, dataset, num_samples: int, **kw):
        self.dataset, self.num_samples, self.kw = dataset, num_samples, kw

    def __iter__(self) -> MicroBatchIterator:
        return MicroBatchIterator(self.dataset, start_sample=0, end_sample=self.num_samples, **self.kw)


class DataIterators(NamedTuple):
    train: MicroBatchIterator
    valid: Optional[ValidBatches]
    train_dataset: object
    valid_dataset: object
    eod: int


def build_data_iterators(cfg: DataConfig, *, vocab_size: int, global_batch_size: int,
                         micro_batch_size: int, dp_rank: int, dp_size: int, train_samples: int,
                         valid_samples: int, consumed_samples: int = 0) -> DataIterators:
    """Build datasets and return `DataIterators(train, valid, ...)` for this DP rank.

    train: iterator of micro-batches from `consumed_samples` to `train_samples` (whole global
    batches). valid: re-iterable over the first `valid_samples` (rounded down to whole global
    batches) validation samples, or None. Call on every rank (collective when a process group
    exists).
    """
    for name, v in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                    ("dp_size", dp_size)):
        if v < 1:
            raise ValueError(f"{name}={v}: must be >= 1")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size*dp_size="
            f"{micro_batch_size * dp_size}; change one of them")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_size})")
    if not 0 <= consumed_samples <= train_samples:
        raise ValueError(f"consumed_samples={consumed_samples} outside [0, train_samples={train_samples}]")
    valid_samples = (valid_samples // global_batch_size) * global_batch_size
    train_ds, valid_ds = build_datasets(cfg, vocab_size=vocab_size, train_samples=train_samples,
                                        valid_samples=valid_samples)
    if len(train_ds) < train_samples:
        raise ValueError(f"the train data yields {len(train_ds)} samples, fewer than train_samples={train_samples}")
    kw = dict(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
              dp_size=dp_size, with_mask=cfg.reset_attention_mask)
    train = MicroBatchIterator(train_ds, start_sample=consumed_samples, end_sample=train_samples, **kw)
    valid = ValidBatches(valid_ds, min(valid_samples, len(valid_ds)), **kw) if valid_ds is not None else None
    return DataIterators(train, valid, train_ds, valid_ds, int(train_ds.config.tokenizer.eod))
