"""A fine-tuned model's task head, kept in its exported directory next to the model.

    <dir>/task_head.safetensors   ``score.weight`` (num_labels, d_model), no bias (GPT-2's
                                  sequence-classification head); metadata: ``kind``
                                  (classification | regression) and ``labels`` (JSON: the label
                                  names in id order, or null for integer labels)

``mom-finetune`` writes it into ``OUT_DIR/model/``; ``mom-convert to-hf OUT_DIR/model`` carries it
into the transformers directory as ``MoMForSequenceClassification``'s (vanilla case:
``GPT2ForSequenceClassification``'s) ``score.weight`` with ``num_labels``, ``problem_type`` and
the label names, so ``AutoModelForSequenceClassification`` loads the fine-tuned classifier.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

HEAD_FILE = "task_head.safetensors"


@dataclass
class TaskHead:
    weight: torch.Tensor  # (num_labels, d_model)
    kind: str  # classification | regression
    labels: list | None = None  # label names in id order (string labels), else None

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])

    def hf_config(self) -> dict:
        """The transformers config fields of this head."""
        names = self.labels or [f"LABEL_{i}" for i in range(self.num_labels)]
        return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
                "problem_type": "regression" if self.kind == "regression" else "single_label_classification"}


def save_task_head(out_dir: str, head: TaskHead) -> str:
    from safetensors.torch import save_file

    path = os.path.join(out_dir, HEAD_FILE)
    save_file({"score.weight": head.weight.detach().float().contiguous()}, path,
              metadata={"kind": head.kind, "labels": json.dumps(head.labels)})
    return path


def load_task_head(model_dir: str) -> TaskHead | None:
    """The head in ``model_dir``, or None (a plain or summarisation model has none)."""
    from safetensors import safe_open

    path = os.path.join(model_dir, HEAD_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            weight = f.get_tensor("score.weight")
        labels = json.loads(meta.get("labels") or "null")
    except Exception as e:  # noqa: BLE001  (safetensors, json and a missing key each raise their own)
        raise ValueError(f"cannot read the task head '{path}' ({type(e).__name__}: {str(e)[:200]}); "
                         "fine-tune again or delete the file to convert the model without it") from None
    kind = meta.get("kind", "classification")
    if kind not in ("classification", "regression") or weight.dim() != 2 or (labels and len(labels) != len(weight)):
        raise ValueError(f"'{path}' is not a task head mom-finetune wrote (kind {kind!r}, shape "
                         f"{tuple(weight.shape)}); fine-tune again or delete the file")
    return TaskHead(weight, kind, labels)
