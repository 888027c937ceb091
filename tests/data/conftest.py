"""Fixtures for the data tests: tiny corpora and one shared tiny SentencePiece model."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_docs(n=40, seed=0):
    """Small English-like documents from the CPython docs, with newlines and non-ASCII text."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    docs = []
    for i in range(n):
        text = topics[keys[(i * 7 + seed) % len(keys)]][: 300 + 37 * i]
        docs.append(f"Document {i} — café naïve 日本.\n{text.strip()}")
    return docs


@pytest.fixture(scope="session")
def docs():
    return make_docs()


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """A 400-piece tokenizer trained once for the session (on the default corpus)."""
    from mom_dist.data.corpus import iter_records, write_default_corpus
    from mom_dist.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("spm")
    path = write_default_corpus(str(d), target_mb=0.5)
    texts = (r.text for _, r in iter_records([path]) if r.text)
    return train_tokenizer(texts, str(d / "tok"), vocab_size=400)


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")
    return str(path)
