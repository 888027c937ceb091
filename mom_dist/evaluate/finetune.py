"""Fine-tuning for the paper's downstream evaluation (GLUE classification, XSUM summarisation).

    prepared = prepare(source, task, out_dir, overrides)   # every input check; no process group yet
    result = finetune(prepared)                             # on DeepSpeed, any EP/ZeRO layout

Reads top to bottom like pre-training, with the trainer's pieces reused: the plain model comes
from a run or exported directory (``load_exported``), gets a task head (``TaskModel``: a linear
score over the last token's hidden state, or the tied LM head for summarisation), expert
parallelism is applied from outside and the DeepSpeed engine built by
``mom_dist.parallel.deepspeed_engine.initialize`` (same module groups, ZeRO stages, clipping and
schedule as pre-training). The training loss keeps the model's balance and z losses:
``task loss + balance_coef * balance + z_loss_coef * z``.

Batches follow the pre-training contract (``batches.micro_batch_index``): optimizer step ``s``
trains examples ``[s*G, (s+1)*G)`` of a seeded order (a new permutation per epoch), so the
losses do not depend on the parallel layout (a test compares 1 process with EP2). Sequences are
right-padded to ``train.seq_len`` (attention is causal: padding never changes the real tokens).

At the end every rank rebuilds the plain model (module pools gathered over the EP group),
evaluates its share of the evaluation file, and rank 0 writes ``eval_results.json`` (metrics),
``predictions.jsonl``, ``metrics.jsonl`` (training losses) and the fine-tuned model
(``model/``: an exported directory with the tokenizer and, for classification/regression, the
head: ``task_head.safetensors``; ``load_task_model`` reads it back, ``mom-convert to-hf`` turns
it into a transformers sequence classifier).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mom_dist.config import Config, ParallelConfig, TrainConfig
from mom_dist.config_utils import apply_overrides, from_dict
from mom_dist.evaluate import tasks as T
from mom_dist.model import MoMModel
from mom_dist.model.config import ModelConfig

# Fine-tuning defaults (override with --set train.X=...): short, small batches, a low rate.
TRAIN_DEFAULTS = dict(steps=1000, global_batch_size=32, micro_batch_size=8, seq_len=256, lr=1e-4, warmup_steps=50,
                      min_lr_ratio=0.0, weight_decay=0.01, log_interval=10, save_interval=0, eval_interval=10 ** 9,
                      tensorboard=False)


# --------------------------------------------------------------------------------- model
@dataclass
class TaskOutput:
    loss: torch.Tensor  # task + balance_coef * balance + z_loss_coef * z
    task_loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    scores: torch.Tensor | None = None  # (B, num_labels) classification/regression outputs


class TaskModel(nn.Module):
    """A ``MoMModel`` with a task head. Exposes ``cfg`` and ``chunks`` so that expert
    parallelism and the DeepSpeed engine apply to it as to the bare model."""

    def __init__(self, mom: MoMModel, kind: str, num_labels: int, init_std: float = 0.02):
        super().__init__()
        self.mom, self.kind = mom, kind
        self.score = None
        assert kind != "regression" or num_labels == 1, "a regression head has one output"
        if kind != "summarization":  # GPT-2's sequence-classification head: no bias
            self.score = nn.Linear(mom.cfg.d_model, num_labels, bias=False)
            nn.init.normal_(self.score.weight, 0.0, init_std)

    @property
    def cfg(self) -> ModelConfig:
        return self.mom.cfg

    @property
    def chunks(self):
        return self.mom.chunks

    def forward(self, tokens_BS, labels, last_B=None, loss_mask_BS=None) -> TaskOutput:
        cfg = self.mom.cfg
        if self.kind == "summarization":
            out = self.mom(tokens_BS, labels, loss_mask_BS=loss_mask_BS)
            return TaskOutput(out.loss, out.lm_loss, out.balance_loss, out.z_loss)
        out = self.mom(tokens_BS, hidden_only=True)
        pooled = out.hidden[torch.arange(tokens_BS.shape[0], device=tokens_BS.device), last_B]
        scores = self.score(pooled.to(self.score.weight.dtype)).float()
        if self.kind == "regression":
            task = F.mse_loss(scores.squeeze(-1), labels.float())
        else:
            task = F.cross_entropy(scores, labels)
        balance, z = self.mom.router_losses(out.routing)
        loss = task
        if cfg.balance_coef > 0:
            loss = loss + cfg.balance_coef * balance
        if cfg.z_loss_coef > 0:
            loss = loss + cfg.z_loss_coef * z
        return TaskOutput(loss, task, balance, z, scores)


# ---------------------------------------------------------------------------------- data
def collate(examples: list, task: T.TaskConfig, seq_len: int, pad: int) -> dict:
    """Right-padded (B, seq_len) tensors; summarisation adds shifted labels and the loss mask."""
    B = len(examples)
    tokens = torch.full((B, seq_len), pad, dtype=torch.long)
    if task.kind == "summarization":
        labels = torch.full((B, seq_len), pad, dtype=torch.long)
        mask = torch.zeros(B, seq_len)
        for i, ex in enumerate(examples):
            seq = (ex.ids + ex.target)[:seq_len + 1]
            n = len(seq) - 1
            tokens[i, :n] = torch.tensor(seq[:-1])
            labels[i, :n] = torch.tensor(seq[1:])
            mask[i, len(ex.ids) - 1:n] = 1.0  # positions whose next token is a summary token (or EOD)
        return {"tokens_BS": tokens, "labels": labels, "loss_mask_BS": mask}
    last = torch.zeros(B, dtype=torch.long)
    for i, ex in enumerate(examples):
        tokens[i, :len(ex.ids)] = torch.tensor(ex.ids)
        last[i] = len(ex.ids) - 1
    dtype = torch.float32 if task.kind == "regression" else torch.long
    return {"tokens_BS": tokens, "labels": torch.tensor([ex.label for ex in examples], dtype=dtype), "last_B": last}


def example_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(examples: list, cfg: Config, task: T.TaskConfig, dims, pad: int, ga: int):
    """This rank's micro-batches, optimizer step by step (the pre-training contract)."""
    from mom_dist.train.batches import micro_batch_index

    t, n = cfg.train, len(examples)
    orders: dict[int, list[int]] = {}

    def example(i):
        epoch = i // n
        if epoch not in orders:
            orders.clear()
            orders[epoch] = example_order(n, t.seed, epoch)
        return examples[orders[epoch][i % n]]

    step = 0
    while True:
        for j in range(ga):
            m = micro_batch_index(j, dims.dp_rank, dims.dp_size)
            first = step * t.global_batch_size + m * t.micro_batch_size
            yield collate([example(first + q) for q in range(t.micro_batch_size)], task, t.seq_len, pad)
        step += 1


# ------------------------------------------------------------------------------- prepare
@dataclass
class Prepared:
    cfg: Config
    task: T.TaskConfig
    source: str
    out_dir: str
    train: list
    eval: list
    eod: int
    tokenizer_path: str
    state_dict: dict  # the source model's weights (plain names)
    label_names: list | None = None  # string labels in id order (classification), else None


def prepare(source: str, task: T.TaskConfig, out_dir: str, overrides: list[str] | None = None, *,
            tokenizer: str | None = None, overwrite: bool = False) -> Prepared:
    """Every check that can fail on user input, before any process group exists."""
    from mom_dist.checkpoint.consolidate import same_architecture
    from mom_dist.checkpoint.sources import read_source
    from mom_dist.convert.model_tokenizer import choose_tokenizer
    from mom_dist.data.tokenizer import Tokenizer

    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"output directory '{out_dir}' exists and is not empty; choose another or pass --overwrite")
    if not os.path.isdir(source):
        raise ValueError(f"model source '{source}' is not a directory: pass a training run or an exported directory")
    try:
        src_model, search = read_source(source)
    except FileNotFoundError as e:
        raise ValueError(f"cannot read the model in '{source}': {e}")
    data = {"model": dataclasses.asdict(src_model.cfg), "train": dict(TRAIN_DEFAULTS, out_dir=out_dir), "parallel": {}}
    data["train"]["seq_len"] = min(data["train"]["seq_len"], src_model.cfg.max_seq_len)
    apply_overrides(data, overrides)
    if set(data) - {"model", "train", "parallel"}:
        raise ValueError(f"--set takes model.*, train.* and parallel.* keys, not {sorted(set(data) - {'model', 'train', 'parallel'})}")
    cfg = Config(model=from_dict(ModelConfig, data["model"], "model."), train=from_dict(TrainConfig, data["train"], "train."),
                 parallel=from_dict(ParallelConfig, data["parallel"], "parallel."))
    cfg.validate()
    if not same_architecture(cfg.model, src_model.cfg):
        raise ValueError("--set model.* may change training options (dropout, loss coefficients, checkpointing), not "
                         "the architecture of the model being fine-tuned")
    tok_path = choose_tokenizer(source, search, tokenizer)  # --tokenizer: only the model's own
    if tok_path is None:
        raise ValueError(f"{search.missing(source)}; pass --tokenizer with the SentencePiece .model the model was "
                         "trained with")
    tok = Tokenizer(tok_path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.model.vocab_size}: it is not "
                         "the model's tokenizer; pass the right --tokenizer")
    train_rows = T.read_rows(task.train_file, task.fields, "training")
    eval_rows = T.read_rows(task.eval_file, task.fields, "evaluation")
    if task.max_eval_examples:
        eval_rows = eval_rows[:task.max_eval_examples]
    labels_map = T.label_mapping(task, train_rows)
    train = T.encode(task, train_rows, tok, cfg.train.seq_len, "training", labels_map)
    evals = T.encode(task, eval_rows, tok, cfg.train.seq_len, "evaluation", labels_map, for_training=False)
    names = sorted(labels_map, key=labels_map.get) if labels_map else None
    return Prepared(cfg, task, source, out_dir, train, evals, tok.eod, tok_path, src_model.state_dict(), names)


def load_task_model(model_dir: str) -> TaskModel:
    """A fine-tuned model back from ``OUT_DIR/model`` (its head, if it has one), in eval mode."""
    from mom_dist.checkpoint.sources import load_exported
    from mom_dist.convert.task_head import load_task_head

    mom, head = load_exported(model_dir), load_task_head(model_dir)
    model = TaskModel(mom, head.kind if head else "summarization", head.num_labels if head else 1)
    if head is not None:
        with torch.no_grad():
            model.score.weight.copy_(head.weight)
    return model.eval()


# -------------------------------------------------------------------------------- train
def build_model(prepared: Prepared) -> TaskModel:
    """The same weights on every rank: source weights + a head drawn from the run's seed."""
    torch.manual_seed(prepared.cfg.train.seed)
    mom = MoMModel(prepared.cfg.model)
    mom.load_state_dict(prepared.state_dict)
    return TaskModel(mom, prepared.task.kind, prepared.task.num_labels, prepared.cfg.model.init_std)


def finetune(prepared: Prepared, *, log=print) -> dict:
    from mom_dist.model.compile import compile_model, compile_summary, compile_wanted
    from mom_dist.parallel import deepspeed_engine
    from mom_dist.parallel.dims import build_parallel_dims
    from mom_dist.parallel.expert_parallel import apply_expert_parallel
    from mom_dist.parallel.runtime import init_distributed
    from mom_dist.quiet import drop_stdout_lines
    from mom_dist.train.metrics import MetricsWriter
    from mom_dist.train.trainer import _device, _grad_norm, _mean_over_ranks, _to

    cfg, task = prepared.cfg, prepared.task
    t, p = cfg.train, cfg.parallel
    with drop_stdout_lines():  # DeepSpeed's 'op built successfully' print, every CPU rank (as mom-train)
        init_distributed(p.backend)
    dims = build_parallel_dims(p.ep_size)
    device = _device()
    ga = deepspeed_engine.gradient_accumulation(cfg, dims)
    model = build_model(prepared)
    apply_expert_parallel(model, dims, p.capacity_factor if p.dispatcher == "capacity" else None)
    engine, clipper = deepspeed_engine.initialize(model, cfg, dims)
    compiled = compile_wanted(t.compile, device)
    if compiled:  # the training steps only: generation's growing cache would recompile per token
        compile_model(engine.module, t.compile_backend)
    torch.manual_seed(t.seed * 7919 + dims.rank + 1)  # dropout streams differ per rank
    if dims.rank == 0 and os.path.exists(os.path.join(prepared.out_dir, "metrics.jsonl")):
        os.remove(os.path.join(prepared.out_dir, "metrics.jsonl"))  # --overwrite: not appended to an old run's
    metrics = MetricsWriter(prepared.out_dir, dims.rank == 0, t.tensorboard)
    batches = micro_batches(prepared.train, cfg, task, dims, prepared.eod, ga)
    losses, tick, last_logged = [], time.time(), 0
    for step in range(1, t.steps + 1):
        parts = torch.zeros(4, device=device)
        for _ in range(ga):
            out = engine(**_to(next(batches), device))
            engine.backward(out.loss)
            engine.step()
            parts += torch.stack([out.loss.detach().float(), out.task_loss.detach().float(),
                                  out.balance_loss.detach().float(), out.z_loss.detach().float()])
        parts = _mean_over_ranks(parts / ga)
        losses.append(parts[0].item())
        if step % t.log_interval == 0 or step in (1, t.steps):
            v = {"loss": parts[0].item(), "task_loss": parts[1].item(), "balance_loss": parts[2].item(),
                 "z_loss": parts[3].item(), "lr": engine.get_lr()[0], "grad_norm": _grad_norm(engine, clipper),
                 "steps_per_s": (step - last_logged) / max(time.time() - tick, 1e-9)}
            metrics.write("finetune", step, v)
            if dims.rank == 0:
                log(f"[finetune] step {step:>5}/{t.steps} | loss {v['loss']:.4f} | task {v['task_loss']:.4f} | "
                    f"balance {v['balance_loss']:.4f} | lr {v['lr']:.2e}")
                if compiled and step == 1:
                    log(f"[finetune] {compile_summary()}")
            tick, last_logged = time.time(), step
    plain = gather_plain(engine.module, prepared, dims, device)
    result = evaluate(plain, prepared, dims, device, log)
    result.update(steps=t.steps, train_losses=losses, final_train_loss=losses[-1] if losses else None)
    if dims.rank == 0:
        metrics.write("eval", t.steps, result["metrics"])
        save_outputs(plain, prepared, result)
        log(f"[finetune] {task.preset or task.kind}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    metrics.close()
    return result


def gather_plain(module, prepared: Prepared, dims, device) -> TaskModel:
    """A plain fp32 copy of the trained model with every module of every pool (the EP ranks'
    slices gathered over the EP group), on every rank."""
    from mom_dist.parallel.deepspeed_engine import plain_state_key

    plain = build_model(prepared).to(device)
    sd = {}
    for name, tensor in module.state_dict().items():
        key, tensor = plain_state_key(name), tensor.detach().float()
        if "_pool." in key and dims.ep_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(dims.ep_size)]
            dist.all_gather(parts, tensor.contiguous(), group=dims.ep_group)  # in EP-rank order
            tensor = torch.cat(parts)
        sd[key] = tensor
    plain.load_state_dict(sd)
    return plain.eval()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: TaskModel, prepared: Prepared, dims, device, log=print) -> dict:
    """Each rank predicts every world-th evaluation example; rank 0 scores them all."""
    from mom_dist.evaluate.generate import greedy_batch

    task, examples = prepared.task, prepared.eval
    mine = list(range(dims.rank, len(examples), dims.world_size))
    preds = {}
    bs = task.eval_batch_size
    for start in range(0, len(mine), bs):
        idx = mine[start:start + bs]
        if task.kind == "summarization":
            outs = greedy_batch(model.mom, [examples[i].ids for i in idx], task.max_new_tokens, prepared.eod, device)
            preds.update({i: o for i, o in zip(idx, outs)})
            continue
        batch = collate([examples[i] for i in idx], task, max(len(examples[i].ids) for i in idx), prepared.eod)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        scores = out.scores.squeeze(-1).tolist() if task.kind == "regression" else out.scores.argmax(-1).tolist()
        preds.update(zip(idx, scores))
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, preds)
    merged = {k: v for part in gathered for k, v in part.items()}
    order = range(len(examples))
    if task.kind == "summarization":
        from mom_dist.data.tokenizer import Tokenizer  # decode on rank 0's copy of the tokenizer
        tok = Tokenizer(prepared.tokenizer_path)
        texts = [tok.decode(merged[i]) for i in order]
        refs = [examples[i].reference for i in order]
        metrics = T.compute_metrics(task, texts, refs)
        predictions = [{"prediction": p, "reference": r} for p, r in zip(texts, refs)]
    else:
        golds = [examples[i].label for i in order]
        predictions = [{"prediction": merged[i], "label": g} for i, g in zip(order, golds)]
        metrics = T.compute_metrics(task, [merged[i] for i in order], golds)
    return {"metrics": metrics, "n_eval": len(examples), "predictions": predictions}


def save_outputs(plain: TaskModel, prepared: Prepared, result: dict) -> None:
    from mom_dist.checkpoint.exported import save_exported
    from mom_dist.convert.task_head import TaskHead, save_task_head

    out = prepared.out_dir
    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model")  # with its tokenizer and head: mom-convert to-hf reads it whole
    save_exported(model_dir, plain.cfg, plain.mom.state_dict(), overwrite=True, tokenizer=prepared.tokenizer_path)
    if plain.score is not None:
        save_task_head(model_dir, TaskHead(plain.score.weight, prepared.task.kind, prepared.label_names))
    with open(os.path.join(out, "predictions.jsonl"), "w") as f:
        for p in result["predictions"]:
            f.write(json.dumps(p) + "\n")
    summary = {"task": dataclasses.asdict(prepared.task), "source": prepared.source, "metrics": result["metrics"],
               "n_eval": result["n_eval"], "n_train": len(prepared.train), "steps": result["steps"],
               "final_train_loss": result["final_train_loss"], "train": dataclasses.asdict(prepared.cfg.train),
               "parallel": dataclasses.asdict(prepared.cfg.parallel)}
    with open(os.path.join(out, "eval_results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
