"""Perplexity of a model on an indexed dataset (``mom-eval``), in one process.

The dataset's documents are read as one token stream (documents end with the end-of-document
id, as ``mom-preprocess`` writes them). Two ways to cut it into windows of ``seq_len`` inputs:

- default: consecutive, non-overlapping windows; each window's first token is context only
  (what training's validation loss measures).
- ``stride=S``: lm-evaluation-harness's rolling windows (``get_rolling_token_windows`` with
  ``max_seq_len=seq_len`` and ``context_len=seq_len-S+1``): every token of the stream is
  predicted exactly once; the first window is prefixed with the end-of-document id, every
  later window predicts the next S tokens with the seq_len-S tokens before them as context.
  ``stride=seq_len`` is lm-eval's ``loglikelihood_rolling``; a smaller stride gives each
  prediction more context (lower perplexity, seq_len/S times the compute).

Before reading anything the data is checked against the model's tokenizer with the training
loader's own check (``mom_dist.data.loader.check_data``), so another tokenizer's data is refused
(the fix is to re-tokenize the data, never to swap the model's tokenizer).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F


def check_data_for_model(prefix: str, vocab_size: int, tokenizer: str | None) -> int:
    """Refuse data the model cannot have been trained on; return the end-of-document id.

    ``tokenizer`` is the model's SentencePiece model (None when unknown). The identity check is
    the one training applies (``check_data``); data that records a tokenizer cannot be checked
    against a model whose tokenizer is unknown, so that is refused too.
    """
    from mom_dist.data import indexed
    from mom_dist.data.loader import DataConfig, check_data

    meta = indexed.read_meta(prefix) or {}
    if tokenizer is not None:
        from mom_dist.convert.hf import check_tokenizer

        tok = check_tokenizer(tokenizer, vocab_size)  # a corrupt .model is bad input, not a traceback
        why = indexed.tokenizer_mismatch(meta, tok)
        if why:  # the model cannot read these ids: the data must change, not the model's tokenizer
            raise ValueError(f"'{prefix}' was tokenized with another tokenizer than the model's ({tokenizer}: {why}); "
                             "re-tokenize the data with the model's tokenizer (mom-preprocess --tokenizer-model "
                             f"{tokenizer} ...)")
    if tokenizer is None and any(k.startswith("tokenizer") and v for k, v in meta.items()):
        raise ValueError(f"'{prefix}' was made with a recorded tokenizer but the model records none, so they cannot "
                         "be compared; pass --tokenizer M.model (the tokenizer the model was trained with)")
    return int(check_data(DataConfig(train_prefixes=[prefix], tokenizer_model=tokenizer), vocab_size).eod)


def read_tokens(prefix: str) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # megatron's import warns about Transformer Engine/Apex it does not need here
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    count = int(ds.index.sequence_lengths.sum())
    return torch.from_numpy(ds.bin_reader.read(dtype=ds.index.dtype, count=count, offset=0).astype("int64"))


def rolling_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows over ``[eod] + tokens`` as (start, length, n_predicted): inputs
    ``ext[start:start+length]``, targets ``ext[start+1:start+length+1]``, of which the last
    ``n_predicted`` are scored."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"--stride {stride} must be between 1 and --seq-len {seq_len}")
    first = min(seq_len, n_tokens)
    windows, predicted = [(0, first, first)], first
    while predicted < n_tokens:
        n = min(n_tokens - predicted, stride)
        end = predicted + n
        windows.append((end - seq_len, seq_len, n))
        predicted = end
    return windows


@torch.no_grad()
def perplexity(model, prefix: str, *, seq_len: int, batch_size: int = 8, max_batches: int | None = None,
               device: str = "cpu", stride: int | None = None, eod: int = 1, progress: bool = False,
               observe=None) -> dict:
    """Mean next-token loss (nats) and perplexity over the windows described in the module doc.

    ``observe(output)``, when given, sees every batch's ``MoMOutput`` (``mom-prune`` counts the
    routing of the same windows with the telemetry counters)."""
    from tqdm import tqdm

    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError("--seq-len and --batch-size must be >= 1")
    if stride is not None and not 1 <= stride <= seq_len:
        raise ValueError(f"--stride {stride} must be between 1 and --seq-len {seq_len}")
    tokens = read_tokens(prefix)
    if stride is None:
        n = (len(tokens) - 1) // seq_len
        if n == 0:
            raise ValueError(f"'{prefix}' has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
        ext, windows = tokens, [(i * seq_len, seq_len, seq_len) for i in range(n)]
    else:
        ext, windows = torch.cat([torch.tensor([eod]), tokens]), rolling_windows(len(tokens), seq_len, stride)
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    if windows[0][1] != windows[-1][1]:  # a stream shorter than one window: only the first is shorter
        batches = [[windows[0]]] + [windows[i:i + batch_size] for i in range(1, len(windows), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    model = model.to(device).eval()
    total, count = 0.0, 0
    for batch in tqdm(batches, desc="mom-eval", unit="batch", file=sys.stderr, disable=not progress,
                      dynamic_ncols=True):
        x = torch.stack([ext[s:s + n + 1] for s, n, _ in batch]).to(device)
        out = model(x[:, :-1])
        if observe is not None:
            observe(out)
        logp = F.log_softmax(out.logits.float(), -1)
        nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, n)
        for row, (_, n, k) in enumerate(batch):
            total += nll[row, n - k:].sum().item()
            count += k
    loss = total / count
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count}
    if stride is not None:
        out["stride"] = stride
    return out
