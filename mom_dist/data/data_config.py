"""`DataConfig`: where the training data is and how samples are drawn (the `data` config section).

Validated on construction (one `ValueError` naming the field and the fix); `from_dict` also
checks every value's type against the annotations (`config_utils.checked_fields`). Used by the
loader (`loader.py`, `megatron_datasets.py`) and checked by `mom-train` before anything is written.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from mom_dist.config_utils import checked_fields


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
