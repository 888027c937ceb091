"""The tokenizer `mom-preprocess` trains when none is given: on the first `--tokenizer-train-mb`
of the inputs' documents (skipped records counted as in the encode), once per work directory
(a resumed run reuses `work/tokenizer.model`). SentencePiece itself: `tokenizer.train_tokenizer`.
"""
from __future__ import annotations

import os
from collections import Counter

from mom_dist.data import corpus
from mom_dist.data.shards import count_skip, no_documents
from mom_dist.data.tokenizer import train_tokenizer
from mom_dist.data.work_dir import Settings


def train_on_inputs(files, settings: Settings, work: str) -> str:
    """Train the tokenizer once; a resumed run reuses work/tokenizer.model."""
    model_path = os.path.join(work, "tokenizer.model")
    if os.path.isfile(model_path):
        return model_path
    cap = int(settings.tokenizer_train_mb * 1024 * 1024)
    seen = Counter()
    skipped, examples = Counter(), []

    def sample_texts():
        for _, rec in corpus.iter_records(files, settings.text_field, settings.max_bytes()):
            seen["records"] += 1
            if rec.text is None:
                count_skip(rec, skipped, examples)
                continue
            seen["docs"] += 1
            yield rec.text
            seen["bytes"] += len(rec.text)
            if seen["bytes"] >= cap:
                return

    texts = sample_texts()
    try:  # look at the first document before SentencePiece does, to name an empty corpus
        first = next(texts)
    except StopIteration:
        raise no_documents(seen["records"], skipped, examples, settings.text_field,
                            "train a tokenizer on") from None

    def chained():
        yield first
        yield from texts

    trained = train_tokenizer(
        chained(), os.path.join(work, "tokenizer_tmp"), vocab_size=settings.vocab_size,
        model_type=settings.model_type, input_sentence_size=settings.input_sentence_size, seed=settings.seed,
    )
    os.replace(trained, model_path)
    return model_path
