"""Which micro-batches a rank trains on, and a synthetic token source for tests.

The contract that makes the numbers independent of the parallel layout: global batch ``s``
holds samples ``[s*G, (s+1)*G)`` of the (seeded) data order, cut into ``G/b`` micro-batches of
``b`` samples; at accumulation step ``j`` data-parallel rank ``r`` of ``dp`` trains micro-batch
``m = j*dp + r``. Every layout therefore sees the same set of micro-batches per optimizer
step, and resuming needs only the consumed-sample count.
"""

from __future__ import annotations

import torch


def micro_batch_index(accum_step: int, dp_rank: int, dp_size: int) -> int:
    return accum_step * dp_size + dp_rank


class SyntheticTokens:
    """Deterministic, learnable token sequences: sample i depends only on (seed, i).

    Each sequence is an arithmetic progression modulo the vocabulary with a little noise, so a
    small model's loss falls quickly. For tests and smoke runs without a corpus.
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 1234):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start, stride = torch.randint(0, self.vocab_size, (2,), generator=g).tolist()
        seq = (start + (stride % 7 + 1) * torch.arange(self.seq_len + 1)) % self.vocab_size
        noise = torch.rand(self.seq_len + 1, generator=g) < 0.05
        return torch.where(noise, torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g), seq)

    def micro_batch(self, first_sample: int, size: int) -> dict:
        seqs = torch.stack([self.sample(first_sample + i) for i in range(size)])
        return {"tokens": seqs[:, :-1].contiguous(), "labels": seqs[:, 1:].contiguous()}

    def iterator(self, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, offset: int = 0):
        """This rank's micro-batches in training order, from ``consumed_samples`` on."""
        step = consumed_samples // global_batch_size
        per_step = global_batch_size // (micro_batch_size * dp_size)
        while True:
            for j in range(per_step):
                m = micro_batch_index(j, dp_rank, dp_size)
                yield self.micro_batch(offset + step * global_batch_size + m * micro_batch_size, micro_batch_size)
            step += 1
