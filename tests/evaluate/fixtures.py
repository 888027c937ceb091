"""Tiny generated tasks, a tiny tokenizer and a tiny exported model for the fine-tuning tests."""

from __future__ import annotations

import json
import os
import random
import shutil

import torch

WORDS = ["red", "blue", "green", "cat", "dog", "tree", "house", "river", "stone", "cloud", "bird", "fish",
         "lamp", "road", "door", "book"]
MODEL = dict(vocab_size=384, max_seq_len=48, d_model=32, n_heads=2, n_bottom=1, n_top=1, n_chunks=1,
             n_attn_modules=2, n_ffn_modules=2, n_steps=2, balance_coef=0.01, z_loss_coef=0.001)
ROUTER = dict(kind="gru", dim=16, top_k=1, temperature=0.5)


def tokenizer(root) -> str:
    """A small SentencePiece model (trained once per directory)."""
    from mom_dist.data.tokenizer import train_tokenizer

    prefix = os.path.join(str(root), "tok")
    if not os.path.exists(prefix + ".model"):
        rng = random.Random(0)
        texts = [" ".join(rng.choice(WORDS + ["good", "bad", "summary", "yes", "no"]) for _ in range(30))
                 for _ in range(300)]
        train_tokenizer(texts, prefix, vocab_size=340)
    return prefix + ".model"


def other_tokenizer(root) -> str:
    """Another SentencePiece model (other texts, fewer ids): not the fixture models' tokenizer."""
    from mom_dist.data.tokenizer import train_tokenizer

    prefix = os.path.join(str(root), "other_tok")
    if not os.path.exists(prefix + ".model"):
        rng = random.Random(1)
        train_tokenizer([" ".join(rng.choice(WORDS[::2]) + str(rng.randrange(100)) for _ in range(20))
                         for _ in range(200)], prefix, vocab_size=300)
    return prefix + ".model"


def exported_model(root, name="model", **overrides) -> str:
    """A randomly initialised MoM exported with its tokenizer next to it (tokenizer.model)."""
    from mom_dist.checkpoint.exported import save_exported
    from mom_dist.model import ModelConfig, MoMModel, RouterConfig

    out = os.path.join(str(root), name)
    if os.path.exists(out):
        return out
    kw = dict(MODEL, attn_router=RouterConfig(**ROUTER), ffn_router=RouterConfig(**dict(ROUTER, top_k=2)))
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    torch.manual_seed(0)
    save_exported(out, cfg, MoMModel(cfg).state_dict())
    shutil.copy(tokenizer(root), os.path.join(out, "tokenizer.model"))
    return out


def classification_rows(n: int, seed: int) -> list[dict]:
    """Separable: the label says whether the sentence contains 'good' (1) or 'bad' (0)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(WORDS) for _ in range(rng.randrange(3, 7))]
        words.insert(rng.randrange(len(words) + 1), "good" if label else "bad")
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def pair_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"sentence1": " ".join(rng.choice(WORDS) for _ in range(4)),
             "sentence2": " ".join(rng.choice(WORDS) for _ in range(3)), "label": rng.randrange(2)} for _ in range(n)]


def summary_rows(n: int, seed: int) -> list[dict]:
    """The summary is the document's first two words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(6)]
        rows.append({"document": " ".join(words), "summary": " ".join(words[:2])})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)
