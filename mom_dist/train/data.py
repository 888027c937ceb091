"""The trainer's data feed: micro-batch iterators for this rank, train and validation.

``data`` section of the config:
- ``{synthetic: {seed: 1234}}``: deterministic synthetic sequences (``batches.SyntheticTokens``),
  for tests and smoke runs;
- otherwise a ``mom_dist.data.loader.DataConfig`` (indexed ``.bin/.idx`` prefixes from
  ``mom-preprocess``, blends, splits), fed through megatron-core's GPTDataset; its index cache
  defaults to ``<train.out_dir>/index_cache``.
Both follow the micro-batch contract in ``batches.py``. Data problems (missing files, a
tokenizer whose vocabulary does not match ``model.vocab_size``) raise here, before training
starts.

Validation is layout-free: ``valid()`` returns ``(n, get)``, where ``get(m)`` is micro-batch m
(samples ``[m*b, (m+1)*b)``) of the validation split and ``n = train.eval_batches`` (fewer if
the split is smaller); the trainer's ``evaluate`` spreads them over the ranks.
"""

from __future__ import annotations

import os

from mom_dist.config import Config
from mom_dist.train.batches import SyntheticTokens


class SyntheticData:
    VALID_OFFSET = 10 ** 9  # validation samples come from a disjoint index range

    def __init__(self, cfg: Config, dims, seed: int):
        t = cfg.train
        self.tokens = SyntheticTokens(cfg.model.vocab_size, t.seq_len, seed)
        self.n_eval = t.eval_batches
        self.kw = dict(global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                       dp_rank=dims.dp_rank, dp_size=dims.dp_size)

    def train(self, consumed_samples: int):
        return self.tokens.iterator(consumed_samples=consumed_samples, **self.kw)

    def valid(self):
        b = self.kw["micro_batch_size"]
        return self.n_eval, lambda m: self.tokens.micro_batch(self.VALID_OFFSET + m * b, b)


class IndexedData:
    def __init__(self, cfg: Config, dims):
        from mom_dist.data.loader import DataConfig

        self.cfg, self.dims = cfg, dims
        data = dict(cfg.data)
        data.setdefault("seq_length", cfg.train.seq_len)
        data.setdefault("seed", cfg.train.seed)
        # The index cache lives where only this run writes (not next to the data, which others
        # may write: mom_dist.data.index_cache) and works with a read-only data folder.
        data.setdefault("cache_dir", os.path.join(cfg.train.out_dir, "index_cache"))
        self.data_cfg = DataConfig.from_dict(data)
        if self.data_cfg.seq_length != cfg.train.seq_len:
            raise ValueError(f"data.seq_length={self.data_cfg.seq_length} differs from train.seq_len="
                             f"{cfg.train.seq_len}; remove data.seq_length (it follows train.seq_len)")
        # Build index caches and check vocab/data now, before training starts.
        self.its = self._iterators(0)

    def _iterators(self, consumed_samples: int):
        from mom_dist.data.loader import build_data_iterators

        t = self.cfg.train
        per_eval = max(1, t.eval_batches) * t.micro_batch_size
        return build_data_iterators(
            self.data_cfg, vocab_size=self.cfg.model.vocab_size, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp_size,
            train_samples=t.steps * t.global_batch_size,
            valid_samples=-(-per_eval // t.global_batch_size) * t.global_batch_size,
            consumed_samples=consumed_samples)

    def train(self, consumed_samples: int):
        its = self.its if consumed_samples == 0 else self._iterators(consumed_samples)
        return iter(its.train)

    def valid(self):
        if self.its.valid is None:
            return None
        from mom_dist.data.loader import MicroBatchIterator

        t, ds = self.cfg.train, self.its.valid_dataset
        b = t.micro_batch_size

        def get(m):  # one micro-batch, as a one-rank iterator over exactly its samples sees it
            return next(MicroBatchIterator(ds, start_sample=m * b, end_sample=(m + 1) * b, global_batch_size=b,
                                           micro_batch_size=b, dp_rank=0, dp_size=1,
                                           with_mask=self.data_cfg.reset_attention_mask))
        return min(t.eval_batches, self.its.valid.num_samples // b), get


def build_data(cfg: Config, dims):
    if "synthetic" in cfg.data:
        extra = set(cfg.data) - {"synthetic"}
        if extra:
            raise ValueError(f"data.synthetic cannot be combined with {sorted(extra)}")
        synthetic = cfg.data["synthetic"] or {}
        if not isinstance(synthetic, dict) or set(synthetic) - {"seed"}:
            raise ValueError(f"data.synthetic={synthetic!r}: the only key is 'seed' (YAML needs a space after "
                             "each ':', e.g. --set data='{synthetic: {seed: 1}}')")
        return SyntheticData(cfg, dims, int(synthetic.get("seed", 1234)))
    return IndexedData(cfg, dims)
