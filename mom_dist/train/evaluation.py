"""Perplexity of a trained model on an indexed dataset, in one process (no DeepSpeed)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, prefix: str, *, seq_len: int, batch_size: int = 8, max_batches: int | None = None,
               device: str = "cpu") -> dict:
    """Mean next-token loss over consecutive, non-overlapping windows of the token stream."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    ds = IndexedDataset(prefix)
    tokens = torch.from_numpy(ds.bin_reader.read(dtype=ds.index.dtype, count=int(ds.index.sequence_lengths.sum()),
                                                 offset=0).astype("int64"))
    if int(tokens.max()) >= model.cfg.vocab_size:
        raise ValueError(f"'{prefix}' holds token id {int(tokens.max())} >= the model's vocab_size "
                         f"{model.cfg.vocab_size}: it was tokenized with another tokenizer")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"'{prefix}' has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    model = model.to(device).eval()
    total, count, batches = 0.0, 0, 0
    for start in range(0, n_windows, batch_size):
        idx = torch.arange(start, min(start + batch_size, n_windows)) * seq_len
        window = torch.stack([tokens[i:i + seq_len + 1] for i in idx.tolist()]).to(device)
        out = model(window[:, :-1], window[:, 1:])
        total += out.lm_loss.item() * window.shape[0] * seq_len
        count += window.shape[0] * seq_len
        batches += 1
        if max_batches and batches >= max_batches:
            break
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count}
