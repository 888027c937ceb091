"""Downstream tasks for ``mom-finetune``: local files, field layouts, encoding, metrics.

Files are read with ``datasets``' packaged builders (JSON/JSON lines, CSV/TSV, parquet) from
local paths only - nothing is downloaded. A *preset* names the field layout and metrics of a
GLUE task or XSUM (the paper's downstream evaluation); without one, the fields are given
explicitly. Encoding (with the model's SentencePiece tokenizer):

    classification / regression:  text_1 [EOD text_2] EOD      (pooled at the last EOD)
    summarisation:                 document PROMPT summary EOD   (loss on summary + EOD only)

Too-long inputs are cut from the end of the longest text (the summary keeps at most
``max_target_len`` tokens). Metrics follow GLUE's definitions (accuracy, binary F1 of class 1,
Matthews correlation, Pearson/Spearman) and ROUGE-1/2/L F-measures from ``rouge-score``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field

from mom_dist.config_utils import check, check_choice

KINDS = ("classification", "regression", "summarization")
# GLUE's field layouts and metrics (as in the GLUE benchmark's datasets), and XSUM's.
PRESETS = {
    "cola": dict(kind="classification", text_fields=["sentence"], num_labels=2, metrics=["matthews_correlation"]),
    "sst2": dict(kind="classification", text_fields=["sentence"], num_labels=2, metrics=["accuracy"]),
    "mrpc": dict(kind="classification", text_fields=["sentence1", "sentence2"], num_labels=2,
                 metrics=["accuracy", "f1"]),
    "qqp": dict(kind="classification", text_fields=["question1", "question2"], num_labels=2,
                metrics=["accuracy", "f1"]),
    "stsb": dict(kind="regression", text_fields=["sentence1", "sentence2"], num_labels=1,
                 metrics=["pearson", "spearmanr"]),
    "mnli": dict(kind="classification", text_fields=["premise", "hypothesis"], num_labels=3, metrics=["accuracy"]),
    "qnli": dict(kind="classification", text_fields=["question", "sentence"], num_labels=2, metrics=["accuracy"]),
    "rte": dict(kind="classification", text_fields=["sentence1", "sentence2"], num_labels=2, metrics=["accuracy"]),
    "wnli": dict(kind="classification", text_fields=["sentence1", "sentence2"], num_labels=2, metrics=["accuracy"]),
    "xsum": dict(kind="summarization", source_field="document", target_field="summary",
                 metrics=["rouge1", "rouge2", "rougeL"]),
}
DEFAULT_METRICS = {"classification": ["accuracy", "f1", "matthews_correlation"], "regression": ["pearson", "spearmanr"],
                   "summarization": ["rouge1", "rouge2", "rougeL"]}
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass
class TaskConfig:
    preset: str | None = None  # a GLUE task name or xsum: fills the fields below
    kind: str = "classification"  # classification | regression | summarization
    train_file: str = ""
    eval_file: str = ""
    text_fields: list = field(default_factory=list)  # one or two text columns (classification/regression)
    label_field: str = "label"
    num_labels: int = 2
    source_field: str = "document"  # summarisation columns
    target_field: str = "summary"
    prompt: str = "\nSummary:"  # between the document and the summary
    max_target_len: int = 64  # summary tokens kept for training
    max_new_tokens: int = 64  # generated at evaluation
    eval_batch_size: int = 16
    max_eval_examples: int | None = None
    metrics: list = field(default_factory=list)

    @classmethod
    def build(cls, preset: str | None = None, **given) -> "TaskConfig":
        """Preset values, overridden by what is given explicitly (None = not given)."""
        given = {k: v for k, v in given.items() if v is not None}
        if preset is not None:
            check(preset in PRESETS, f"unknown task preset '{preset}'; choose one of {', '.join(PRESETS)}, or pass "
                                     "--task classification|regression|summarization with the field names")
            given = {**PRESETS[preset], **given}
        cfg = cls(preset=preset, **given)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_choice(self.kind, KINDS, "task")
        check(bool(self.train_file) and bool(self.eval_file), "pass both --train and --eval files")
        if self.kind != "summarization":
            check(1 <= len(self.text_fields) <= 2, f"--text-fields {self.text_fields}: give one or two column names")
            if self.kind == "classification":
                check(self.num_labels >= 2, f"--num-labels {self.num_labels} must be >= 2 for classification")
            else:
                self.num_labels = 1
        check(self.max_target_len >= 1 and self.max_new_tokens >= 1 and self.eval_batch_size >= 1,
              "--max-target-len, --max-new-tokens and --eval-batch-size must be >= 1")
        self.metrics = list(self.metrics or DEFAULT_METRICS[self.kind])
        unknown = set(self.metrics) - set(METRICS) - {"rouge1", "rouge2", "rougeL"}
        check(not unknown, f"unknown metrics {sorted(unknown)}; known: {sorted(METRICS) + ['rouge1', 'rouge2', 'rougeL']}")

    @property
    def fields(self) -> list[str]:
        if self.kind == "summarization":
            return [self.source_field, self.target_field]
        return list(self.text_fields) + [self.label_field]


# ------------------------------------------------------------------------------ reading
def read_rows(path: str, fields: list[str], what: str) -> list[dict]:
    """The given columns of a local JSON/CSV/TSV/parquet file, as a list of dicts."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} file '{path}' does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in BUILDERS:
        raise ValueError(f"{what} file '{path}': unknown format '{ext or '(none)'}'; use .json/.jsonl, .csv, .tsv "
                         "or .parquet")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our one-line error says it; no log spew
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for the hub
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    with tempfile.TemporaryDirectory(prefix="mom_finetune_") as cache:  # no shared HF cache, no stale copies
        try:
            ds = datasets.load_dataset(BUILDERS[ext], data_files=path, split="train", cache_dir=cache, **kwargs)
        except Exception as e:  # datasets raises many types for malformed files; the root cause says most
            while (e.__cause__ or e.__context__) is not None:
                e = e.__cause__ or e.__context__
            first = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"cannot read {what} file '{path}' as {BUILDERS[ext]}: {first}")
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise ValueError(f"{what} file '{path}' has no field {missing[0]!r} (its fields: "
                             f"{', '.join(ds.column_names)}); pass the right --text-fields/--label-field/"
                             "--source-field/--target-field or another --task preset")
        if len(ds) == 0:
            raise ValueError(f"{what} file '{path}' holds no rows")
        return ds.select_columns(fields).to_list()


# ----------------------------------------------------------------------------- encoding
@dataclass
class Example:
    ids: list  # classification/regression: the whole input; summarisation: document + prompt
    label: float | int | None = None
    target: list | None = None  # summarisation: summary tokens + EOD
    reference: str | None = None  # summarisation: the reference summary text


def _fit(parts: list[list[int]], budget: int) -> list[list[int]]:
    """Cut the longest part by one token at a time until the total fits ``budget``."""
    parts = [list(p) for p in parts]
    while sum(map(len, parts)) > budget and any(parts):
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest].pop()
    return parts


def encode(task: TaskConfig, rows: list[dict], tok, seq_len: int, what: str, labels_map: dict | None = None,
           for_training: bool = True) -> list[Example]:
    eod = tok.eod
    if task.kind == "summarization":
        prompt = tok.encode(task.prompt)
        docs = tok.encode_batch([str(r[task.source_field] or "") for r in rows])
        sums = tok.encode_batch([str(r[task.target_field] or "") for r in rows])
        out = []
        for r, d, s in zip(rows, docs, sums):
            target = s[:task.max_target_len] + [eod]
            room = seq_len + 1 - len(prompt) - len(target) if for_training else seq_len - len(prompt) - task.max_new_tokens
            if room < 1:
                raise ValueError(f"train.seq_len={seq_len} leaves no room for the document next to the prompt and "
                                 f"{len(target) if for_training else task.max_new_tokens} summary tokens; raise "
                                 "train.seq_len or lower --max-target-len/--max-new-tokens")
            out.append(Example(d[:room] + prompt, target=target, reference=str(r[task.target_field] or "")))
        return out
    texts = [tok.encode_batch([str(r[f] if r[f] is not None else "") for r in rows]) for f in task.text_fields]
    out = []
    for i, r in enumerate(rows):
        label = r[task.label_field]
        if task.kind == "classification":
            label = _class_id(label, task, labels_map, what, i)
        else:
            try:
                label = float(label)
            except (TypeError, ValueError):
                raise ValueError(f"{what} row {i}: label {label!r} in field '{task.label_field}' is not a number")
        parts = _fit([t[i] for t in texts], seq_len - len(texts))
        ids = parts[0] + [eod] + (parts[1] + [eod] if len(parts) > 1 else [])
        out.append(Example(ids, label=label))
    return out


def _class_id(label, task: TaskConfig, labels_map: dict | None, what: str, row: int) -> int:
    if labels_map is not None:
        if label not in labels_map:
            raise ValueError(f"{what} row {row}: label {label!r} does not occur in the training file")
        return labels_map[label]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < task.num_labels:
        hint = (" (-1 marks GLUE's unlabelled test split: evaluate on the validation split)" if label == -1 else "")
        raise ValueError(f"{what} row {row}: label {label!r} in field '{task.label_field}' is not a class id in "
                         f"[0, {task.num_labels}){hint}; string labels are mapped when every label is a string")
    return label


def label_mapping(task: TaskConfig, train_rows: list[dict]) -> dict | None:
    """String labels -> ids in sorted order (the training file's labels); None for integer labels."""
    if task.kind != "classification":
        return None
    labels = {r[task.label_field] for r in train_rows}
    if not all(isinstance(v, str) for v in labels):
        return None
    if len(labels) > task.num_labels:
        raise ValueError(f"the training file has {len(labels)} distinct labels but --num-labels is {task.num_labels}")
    return {v: i for i, v in enumerate(sorted(labels))}


# ------------------------------------------------------------------------------ metrics
def accuracy(pred, gold) -> float:
    return sum(int(p == g) for p, g in zip(pred, gold)) / max(1, len(gold))


def f1(pred, gold) -> float:
    """Binary F1 of class 1 (GLUE's MRPC/QQP metric)."""
    tp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 1)
    fp = sum(1 for p, g in zip(pred, gold) if p == 1 and g != 1)
    fn = sum(1 for p, g in zip(pred, gold) if p != 1 and g == 1)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_correlation(pred, gold) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K; the binary MCC for two classes)."""
    classes = sorted(set(pred) | set(gold))
    n = len(gold)
    correct = sum(int(p == g) for p, g in zip(pred, gold))
    t = {c: sum(1 for g in gold if g == c) for c in classes}
    p = {c: sum(1 for q in pred if q == c) for c in classes}
    cov_tp = correct * n - sum(t[c] * p[c] for c in classes)
    cov_pp = n * n - sum(p[c] ** 2 for c in classes)
    cov_tt = n * n - sum(t[c] ** 2 for c in classes)
    return 0.0 if cov_pp == 0 or cov_tt == 0 else cov_tp / math.sqrt(cov_pp * cov_tt)


def pearson(pred, gold) -> float:
    n = len(gold)
    mp, mg = sum(pred) / n, sum(gold) / n
    cov = sum((a - mp) * (b - mg) for a, b in zip(pred, gold))
    sp = math.sqrt(sum((a - mp) ** 2 for a in pred))
    sg = math.sqrt(sum((b - mg) ** 2 for b in gold))
    return 0.0 if sp == 0 or sg == 0 else cov / (sp * sg)


def _ranks(xs) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearmanr(pred, gold) -> float:
    return pearson(_ranks(pred), _ranks(gold))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation, "pearson": pearson,
           "spearmanr": spearmanr}


def rouge(predictions: list[str], references: list[str], types=("rouge1", "rouge2", "rougeL")) -> dict:
    """Mean ROUGE F-measures (``rouge-score``, Porter stemming as in the XSUM literature)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ValueError("summarisation metrics need the rouge-score package: pip install rouge-score==0.1.2 "
                         "(or mom_dist[finetune])")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = {t: 0.0 for t in types}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: v / max(1, len(references)) for t, v in totals.items()}


def compute_metrics(task: TaskConfig, predictions: list, golds: list) -> dict:
    if task.kind == "summarization":
        return rouge(predictions, golds, [m for m in task.metrics if m.startswith("rouge")])
    return {m: METRICS[m](predictions, golds) for m in task.metrics}
