"""The study's corpus: the real English text this machine ships, offline, as one JSON-lines file.

Sources, in this order (each capped in MB of text; exact duplicate documents dropped):
  1. the CPython documentation topics (``pydoc_data.topics``, what ``write_default_corpus``
     samples from), every topic once as its own document;
  2. docstrings of the Python standard library (module, class and function docstrings of 200+
     characters, one document per module, test packages left out), up to ``python_mb``;
  3. plain-text files under /usr/share/doc (README, NEWS, changelogs, copyright, .txt/.md/.rst,
     gzip-compressed ones read), sorted by path, up to ``doc_mb``;
  4. man pages (English sections man1-man8) rendered with man(1) at 80 columns, largest first, up
     to ``man_mb`` (skipped when man is not installed).
What was found is machine-dependent; ``manifest.json`` next to the corpus records each source's
documents and bytes, and the results file states them.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import shutil
import sysconfig

from preprocess_throughput import _render_man

DOC_NAMES = ("readme", "news", "changelog", "changes", "copyright", "authors", "history", "todo", "thanks")
DOC_SUFFIXES = (".txt", ".md", ".rst")
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}


def _topics():
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _stdlib_docstrings():
    std = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(std):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            docs = [ast.get_docstring(n) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            docs = [d for d in docs if d and len(d) >= 200]
            if docs:
                yield "\n\n".join(docs)


def _doc_files():
    paths = []
    for root, dirs, files in os.walk("/usr/share/doc"):
        dirs.sort()
        for name in files:
            base = name[:-3] if name.endswith(".gz") else name
            low = base.lower()
            if low.endswith(DOC_SUFFIXES) or low.split(".")[0] in DOC_NAMES:
                paths.append(os.path.join(root, name))
    for path in sorted(paths):
        if os.path.islink(path):
            continue
        try:
            raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
            yield raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue


def _man_pages():
    if not shutil.which("man"):
        return
    pages = [os.path.join(r, n) for r, _, ns in os.walk("/usr/share/man") if os.path.basename(r).startswith("man")
             and os.path.dirname(r) == "/usr/share/man" for n in ns]
    pages.sort(key=lambda p: (-os.path.getsize(p), p))  # largest first: the most prose per render
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        for start in range(0, len(pages), 32):
            yield from (t for t in ex.map(_render_man, pages[start:start + 32]) if t)


def build_corpus(out_dir: str, *, python_mb: float, doc_mb: float, man_mb: float) -> dict:
    """Write ``out_dir/study_corpus.jsonl`` (once) and return its manifest."""
    path = os.path.join(out_dir, "study_corpus.jsonl")
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    sources = [("CPython documentation topics (pydoc_data), each once", _topics, None),
               ("Python standard library docstrings (one document per module)", _stdlib_docstrings, python_mb),
               ("/usr/share/doc plain-text files (README, NEWS, changelogs, copyright, .txt/.md/.rst)", _doc_files,
                doc_mb),
               ("man pages, English sections, rendered by man(1) at 80 columns, largest first", _man_pages, man_mb)]
    seen, parts = set(), []
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for label, gen, cap_mb in sources:
            docs = written = 0
            cap = None if cap_mb is None else cap_mb * 2 ** 20
            for text in gen():
                text = text.strip()
                digest = hashlib.sha1(text.encode("utf-8", "replace")).digest()
                if len(text) < 200 or digest in seen:
                    continue
                seen.add(digest)
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if cap is not None and written >= cap:
                    break
            parts.append({"source": label, "documents": docs, "mb": written / 2 ** 20})
    os.replace(path + ".tmp", path)
    manifest = {"path": path, "sources": parts, "documents": sum(p["documents"] for p in parts),
                "mb": sum(p["mb"] for p in parts)}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
