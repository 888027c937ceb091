"""KV caches for generation with a MoM (issue: the authors' release shares one cache across
routing steps and so decodes wrongly).

Every attention that runs has its own cache: each bottom/anchor/top layer, and each *routing
step* of each chunk, because the mixed K/V of step h come from step h's picks. A chunk's cache
also remembers which cached tokens were all-SKIP (their zero key is masked when
``mask_skip_keys`` is on).
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self):
        self.k_BLD: torch.Tensor | None = None
        self.v_BLD: torch.Tensor | None = None
        self.keep_BL: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k_BLD is None else self.k_BLD.shape[1]

    def append(self, k_BSD, v_BSD, keep_BS):
        """Add this call's keys/values; return everything cached so far."""
        if self.k_BLD is None:
            self.k_BLD, self.v_BLD, self.keep_BL = k_BSD, v_BSD, keep_BS
        else:
            self.k_BLD = torch.cat([self.k_BLD, k_BSD], 1)
            self.v_BLD = torch.cat([self.v_BLD, v_BSD], 1)
            if keep_BS is not None:
                self.keep_BL = torch.cat([self.keep_BL, keep_BS], 1)
        return self.k_BLD, self.v_BLD, self.keep_BL


class ModelCache:
    """All caches of one model, laid out like the model's layers."""

    def __init__(self, cfg):
        self.bottom = [LayerCache() for _ in range(cfg.n_bottom)]
        self.chunks = [[LayerCache() for _ in range(cfg.n_steps)] for _ in range(cfg.n_chunks)]
        self.anchors = [LayerCache() for _ in range(cfg.n_chunks if cfg.anchor else 0)]
        self.top = [LayerCache() for _ in range(cfg.n_top)]

    def __len__(self) -> int:
        return len(self.chunks[0][0])
