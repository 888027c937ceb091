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

Index caches: megatron writes its sample/shuffle indices under `cache_dir`. With a process
group, global rank 0 builds them, all ranks meet at a barrier, then the others load them;
we first check that every rank can see a file rank 0 wrote, and fail clearly if not (the
multi-node failure when the cache dir is node-local). With `cache_shared=False` the local
rank 0 of every other node builds its node's copy first, in a child process without a
process group. Without a process group (one process) everything is built in-process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np

from mom_dist.config_utils import checked_fields
from mom_dist.data import indexed

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the training data is and how samples are drawn. Validated on construction."""

    train_prefixes: Union[list[str], str] = field(default_factory=list)
    train_weights: Optional[list[float]] = None   # None: weights proportional to each prefix's tokens
    valid_prefixes: Union[list[str], str, None] = None  # None: validation comes from `split` of the train data
    valid_weights: Optional[list[float]] = None
    split: Union[str, int, None] = None    # train,valid,test parts of each train prefix, only
                                           # without valid_prefixes (None: "969,30,1")
    seq_length: int = 1024
    seed: int = 1234
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    cache_dir: Optional[str] = None        # None: "index_cache" next to the first train prefix
    cache_shared: bool = True              # False: cache_dir is node-local (see module doc)
    tokenizer_model: Optional[str] = None  # checked against the data and the model vocab

    def __post_init__(self):
        def bad(name, why, fix):
            raise ValueError(f"DataConfig.{name}: {why}; {fix}")

        if isinstance(self.train_prefixes, str):
            self.train_prefixes = [self.train_prefixes]
        if not self.train_prefixes:
            bad("train_prefixes", "empty", "give at least one PREFIX of a PREFIX.bin/.idx pair "
                "(e.g. data/owt_train_text_document)")
        for name in ("train", "valid"):
            prefixes = getattr(self, f"{name}_prefixes")
            weights = getattr(self, f"{name}_weights")
            if isinstance(prefixes, str):
                setattr(self, f"{name}_prefixes", [prefixes])
                prefixes = [prefixes]
            if weights is not None:
                if prefixes is None or len(weights) != len(prefixes):
                    bad(f"{name}_weights", f"{len(weights)} weights for {len(prefixes or [])} prefixes",
                        "give one weight per prefix or None")
                if any((not isinstance(w, (int, float))) or w <= 0 for w in weights):
                    bad(f"{name}_weights", f"{weights} has a non-positive weight", "use weights > 0")
        for p in list(self.train_prefixes) + list(self.valid_prefixes or []):
            if p.endswith((".bin", ".idx")):
                bad("train_prefixes/valid_prefixes", f"{p!r} ends with .bin/.idx",
                    "give the prefix without the extension")
        if self.split is not None and self.valid_prefixes:
            bad("split", f"{self.split!r} is set together with valid_prefixes, which already hold the "
                "validation data (split would be ignored)", "remove split, or remove valid_prefixes to carve "
                "validation out of the train prefixes")
        try:
            parts = [float(x) for x in str(self.resolved_split()).split(",")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
            bad("split", f"{self.split!r} is not a megatron split", 'use "train,valid,test" weights like "969,30,1"')
        if parts[0] <= 0:
            bad("split", f"{self.split!r} gives no training data", "make the first part positive")
        if not isinstance(self.seq_length, int) or self.seq_length < 1:
            bad("seq_length", f"{self.seq_length!r}", "use a positive int such as 1024")
        if not isinstance(self.seed, int):
            bad("seed", f"{self.seed!r} is not an int", "use an int")
        for flag in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss", "cache_shared"):
            if not isinstance(getattr(self, flag), bool):
                bad(flag, f"{getattr(self, flag)!r} is not a bool", "use true or false")

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DataConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**checked_fields(cls, d, "data."))  # types, from the annotations above

    def resolved_split(self) -> str:
        return self.split if self.split is not None else "969,30,1"

    def resolved_cache_dir(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        return os.path.join(os.path.dirname(os.path.abspath(self.train_prefixes[0])), "index_cache")


# --------------------------------------------------------------------------- checks


class _TokenizerInfo:
    """What megatron's GPTDataset reads from a tokenizer: vocab_size, eod, unique_identifiers.

    unique_identifiers also carries a fingerprint of every .idx, so megatron's index caches
    (named by a hash of it) are rebuilt when the data behind a prefix is regenerated.
    """

    def __init__(self, vocab_size: int, eod: int, identity: dict):
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = identity


def _fingerprint(prefix: str) -> str:
    h = hashlib.sha256()
    with open(prefix + ".idx", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    h.update(str(os.path.getsize(prefix + ".bin")).encode())
    return h.hexdigest()[:16]


def check_data(cfg: DataConfig, vocab_size: int) -> _TokenizerInfo:
    """Refuse corrupt data, data from another tokenizer, or ids the model cannot embed."""
    tok = None
    if cfg.tokenizer_model:
        from mom_dist.data.tokenizer import Tokenizer

        tok = Tokenizer(cfg.tokenizer_model)
        if tok.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer {cfg.tokenizer_model} has {tok.vocab_size} ids but the model's vocab_size "
                f"is {vocab_size}; set the model vocab_size to >= {tok.vocab_size} (padding is fine)"
            )
    eods, prints = set(), {}
    for prefix in list(cfg.train_prefixes) + list(cfg.valid_prefixes or []):
        info = indexed.read_index(prefix)  # raises DataIntegrityError with the fix
        if info.documents == 0:
            raise indexed.DataIntegrityError(f"{prefix} holds no documents; check the preprocess summary")
        meta = indexed.read_meta(prefix) or {}
        max_id = meta.get("max_token_id")
        if max_id is None or meta.get("documents") != info.documents:
            max_id = indexed.max_token_id(prefix, info)
        if max_id >= vocab_size:
            raise ValueError(
                f"{prefix} holds token id {max_id} but the model's vocab_size is {vocab_size}: the data "
                "was made with a larger tokenizer; use the matching tokenizer/model vocab"
            )
        # The .meta.json describes what was written; a sample of the .bin itself must agree
        # (ids inside the vocab, documents ending with EOD), or training would index out of range.
        data_vocab = min(vocab_size, int(meta.get("vocab_size") or vocab_size))
        indexed.check_tokens(prefix, info, data_vocab, meta.get("eod") if meta.get("eod_terminated") else None)
        why = indexed.tokenizer_mismatch(meta, tok) if tok is not None else None
        if why:
            raise ValueError(
                f"{prefix} was tokenized with another tokenizer than {cfg.tokenizer_model} ({why}); "
                "use the .model written next to the data"
            )
        if meta.get("eod") is not None:
            eods.add(int(meta["eod"]))
        prints[os.path.abspath(prefix)] = _fingerprint(prefix)
    if tok is not None:
        if eods and eods != {tok.eod}:
            raise ValueError(f"data EOD ids {sorted(eods)} differ from the tokenizer's {tok.eod}")
        eod = tok.eod
    elif len(eods) == 1:
        eod = eods.pop()
    else:
        raise ValueError(
            "cannot tell the end-of-document id: set DataConfig.tokenizer_model, or use data written "
            f"by mom-preprocess / write_token_documents (their .meta.json records it); found {sorted(eods)}"
        )
    identity = {"eod": eod, "tokenizer": tok.identity if tok else None, "data": prints}
    return _TokenizerInfo(vocab_size, eod, identity)


def write_token_documents(prefix: str, docs, vocab_size: int, eod: int = 0) -> dict:
    """Write token-id documents as `{prefix}.bin/.idx` (+ .meta.json) for tests and tools.

    Documents are written as given (append `eod` yourself if you want document ends);
    `eod` is recorded so the loader's EOD options know it. No sentencepiece involved.
    """
    docs = [list(map(int, d)) for d in docs]
    for d in docs:
        if d and (min(d) < 0 or max(d) >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size}); got a document with {min(d)}..{max(d)}")
    dtype = indexed.token_dtype(vocab_size)
    info = indexed.write_documents(prefix, docs, dtype)
    indexed.write_meta(prefix, {"vocab_size": vocab_size, "eod": eod, "dtype": np.dtype(dtype).name,
                                "tokenizer_sha256": None, "max_token_id": info["max_token_id"],
                                "documents": info["documents"], "tokens": info["tokens"]})
    return info


# --------------------------------------------------------------------------- dataset building


def _gpt_config(cfg: DataConfig, tok: _TokenizerInfo, prefix: str, split: str, cache: Optional[str]):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length, blend=([prefix], None), split=split,
        path_to_cache=cache, tokenizer=tok, reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask, eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.reset_attention_mask, mid_level_dataset_surplus=0.005,
    )


def _weights(prefixes, weights):
    if weights is None:  # proportional to tokens, as if the prefixes were one corpus
        weights = [float(indexed.read_index(p).tokens) for p in prefixes]
    total = float(sum(weights))
    return [w / total for w in weights]


def _build_splits(cfg: DataConfig, tok: _TokenizerInfo, train_samples: int, valid_samples: int):
    """Build (train, valid) datasets; megatron handles rank-0-first when a group exists."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from mom_dist.data.index_cache import CheckedGPTDataset

    cache = cfg.resolved_cache_dir()
    surplus = 0.005  # megatron's mid-level surplus, so a blend never runs a member dry

    def build(prefixes, weights, split, targets):
        """One blend: per-prefix GPTDatasets for every split, then blended per split."""
        ws = _weights(prefixes, weights)
        per_split = [[], [], []]
        for p, w in zip(prefixes, ws):
            sizes = [t if len(prefixes) == 1 else int(math.ceil(math.ceil(t * w) * (1 + surplus)))
                     for t in targets]
            builder = BlendedMegatronDatasetBuilder(
                CheckedGPTDataset, [max(n, 1) for n in sizes], lambda: True, _gpt_config(cfg, tok, p, split, cache))
            for i, ds in enumerate(builder.build()):
                per_split[i].append(ds)
        out = []
        for i, parts in enumerate(per_split):
            if not parts or parts[0] is None or targets[i] == 0:
                out.append(None)
            elif len(parts) == 1:
                out.append(parts[0])
            else:
                # megatron's BlendedDataset, in memory (no cache): its cache path calls
                # get_rank() even without a process group, the blend index is cheap, and
                # megatron would load a blend cache with allow_pickle=True (index_cache.py).
                out.append(BlendedDataset(parts, ws, targets[i], _gpt_config(cfg, tok, prefixes[0], split, None)))
        return out

    if cfg.valid_prefixes:
        train = build(cfg.train_prefixes, cfg.train_weights, "1,0,0", [train_samples, 0, 0])[0]
        valid = build(cfg.valid_prefixes, cfg.valid_weights, "0,1,0", [0, valid_samples, 0])[1] \
            if valid_samples > 0 else None
    else:
        train, valid, _ = build(cfg.train_prefixes, cfg.train_weights, cfg.resolved_split(),
                                [train_samples, valid_samples, 0])
    return train, valid


def _build_in_child(cfg_dict: dict, vocab_size: int, train_samples: int, valid_samples: int) -> None:
    """Entry of the child process that fills a node-local cache (no process group here)."""
    cfg = DataConfig(**cfg_dict)
    _build_splits(cfg, check_data(cfg, vocab_size), train_samples, valid_samples)


def _check_cache_visible(cache: str) -> None:
    """Every rank must see a file global rank 0 wrote in cache_dir, or the caches cannot be shared."""
    import torch
    import torch.distributed as dist

    os.makedirs(cache, exist_ok=True)
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(cache, f".probe-{token[0]}")
    if dist.get_rank() == 0:
        with open(probe, "w") as f:
            f.write("ok")
    dist.barrier()
    missing = torch.tensor([0 if os.path.exists(probe) else 1])
    dist.all_reduce(missing)
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(probe)
    if int(missing.item()):
        raise RuntimeError(
            f"{int(missing.item())} rank(s) cannot see files global rank 0 writes in cache_dir={cache!r}: "
            "it is not shared between nodes. Put it on a shared filesystem, or set "
            "DataConfig.cache_shared=False to build one copy per node"
        )


def build_datasets(cfg: DataConfig, *, vocab_size: int, train_samples: int, valid_samples: int):
    """Check the data, then build (train, valid) datasets on every rank (see module doc)."""
    import torch.distributed as dist

    tok = check_data(cfg, vocab_size)
    cache = cfg.resolved_cache_dir()
    if dist.is_available() and dist.is_initialized():
        if cfg.cache_shared:
            _check_cache_visible(cache)
        else:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank == 0 and dist.get_rank() != 0:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")
                child = ctx.Process(target=_build_in_child,
                                    args=(dataclasses.asdict(cfg), vocab_size, train_samples, valid_samples))
                child.start()
                child.join()
                if child.exitcode != 0:
                    raise RuntimeError(f"building the node-local index cache in {cache} failed "
                                       f"(exit code {child.exitcode}); see the child's traceback above")
            dist.barrier()
    return _build_splits(cfg, tok, train_samples, valid_samples)


# --------------------------------------------------------------------------- micro-batches

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
