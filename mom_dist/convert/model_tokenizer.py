"""Which tokenizer belongs to a model, wherever the model comes from, and what a ``--tokenizer``
flag may change about it.

    search = run_tokenizer_search(mom_state)     # a training run: its data's tokenizer
    search = dir_tokenizer_search(directory)     # an exported / to-hf directory: tokenizer.model
    path = choose_tokenizer(source, search, given)   # --tokenizer must be that same tokenizer

A run names its tokenizer by the paths in its config (``data.tokenizer_model``, or the
``tokenizer_model`` that mom-preprocess recorded next to its data prefixes), often relative to
the directory the run was started in. The trainer records that directory (``workdir`` in the
config it saves with every checkpoint), so the tools resolve the paths from anywhere; for runs
saved before it was recorded, the current directory is the only base there is. Whatever is not
found is reported with the paths that were tried.

A tokenizer is the model's when its vocabulary identity (``Tokenizer.identity``: pieces,
scores, normalisation) equals the recorded one's; the file name and bytes may differ. A
``--tokenizer`` with another identity is refused: the model would read ids it never learned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

TOKENIZER_FILE = "tokenizer.model"


@dataclass
class TokenizerSearch:
    path: str | None = None  # the model's SentencePiece model, when found
    looked_for: tuple = ()  # where a recorded one was looked for (empty: none is recorded)

    def missing(self, source: str) -> str:
        """Why there is no tokenizer, for an error line (call when ``path`` is None)."""
        if self.looked_for:
            return (f"the tokenizer recorded for '{source}' was not found (looked for "
                    f"{', '.join(self.looked_for)})")
        return f"no tokenizer is recorded for '{source}'"


def _bases(path: str, workdir: str | None) -> list[str]:
    """Where a path from a run's config may be: as is when absolute, else under the run's
    recorded working directory (or, for runs that did not record it, under this one)."""
    if os.path.isabs(path):
        return [path]
    return [os.path.normpath(os.path.join(workdir, path))] if workdir else [os.path.abspath(path)]


def run_path(path: str, workdir: str | None) -> str:
    """A path from a run's config (data prefix, tokenizer) as the run meant it."""
    return _bases(path, workdir)[0]


def run_tokenizer_search(state: dict) -> TokenizerSearch:
    """The tokenizer a training run's data was made with, from its checkpoint's ``mom_state``:
    ``data.tokenizer_model``, else the ``tokenizer_model`` mom-preprocess recorded next to the
    first data prefix whose ``.meta.json`` is found."""
    config = state.get("config") or {}
    data, workdir = config.get("data") or {}, config.get("workdir")
    looked: list[str] = []
    if data.get("tokenizer_model"):
        for path in _bases(str(data["tokenizer_model"]), workdir):
            if os.path.isfile(path):
                return TokenizerSearch(os.path.abspath(path))
            looked.append(path)
    prefixes = []
    for key in ("train_prefixes", "valid_prefixes"):  # a list, or one prefix as a string
        value = data.get(key) or []
        prefixes += [value] if isinstance(value, str) else list(value)
    for prefix in prefixes:
        for base in _bases(str(prefix), workdir):
            try:
                with open(base + ".meta.json") as f:
                    rel = json.load(f).get("tokenizer_model")
            except OSError:
                if not os.path.exists(base + ".idx"):  # the data is not here: its record may name one
                    looked.append(base + ".meta.json")
                continue  # (data without a .meta.json records no tokenizer)
            except ValueError:
                continue
            if rel:
                path = os.path.join(os.path.dirname(base), rel)
                if os.path.isfile(path):
                    return TokenizerSearch(path)
                looked.append(path)
    return TokenizerSearch(None, tuple(dict.fromkeys(looked)))


def dir_tokenizer_search(path: str) -> TokenizerSearch:
    """An exported or to-hf directory carries its tokenizer as ``tokenizer.model`` (or none)."""
    tok = os.path.join(path, TOKENIZER_FILE)
    return TokenizerSearch(tok if os.path.isfile(tok) else None)


def choose_tokenizer(source: str, recorded: TokenizerSearch, given: str | None) -> str | None:
    """The tokenizer to use with the model from ``source``: its own; ``given`` (--tokenizer) only
    where it records none (or its file is gone) or when ``given`` is the same tokenizer."""
    if given is None or recorded.path is None:
        return given or recorded.path
    from mom_dist.data.tokenizer import Tokenizer

    if not os.path.isfile(given):
        raise ValueError(f"--tokenizer {given}: no such file; pass the SentencePiece .model the model was trained "
                         "with, or leave --tokenizer out")
    if Tokenizer(given).identity != Tokenizer(recorded.path).identity:
        raise ValueError(f"--tokenizer {given} is not the tokenizer '{source}' was trained with ({recorded.path}: "
                         "their vocabularies differ), so the model would read ids it never learned; leave "
                         "--tokenizer out, and for data made with another tokenizer, re-tokenize the data with "
                         f"the model's tokenizer (mom-preprocess --tokenizer-model {recorded.path})")
    return recorded.path
