"""Checks of indexed data before training: corrupt or truncated files, ids the model cannot
embed, data from another tokenizer, an unknown end-of-document id (`check_data`); and
`write_token_documents`, which writes token lists straight to `.bin/.idx` (tests, tools).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from mom_dist.data import indexed
from mom_dist.data.data_config import DataConfig


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
