"""``mom-plan --compare``: the efficiency table of several models side by side (text, markdown
or JSON), from config files or training run directories (their ``config.json`` and measured
routing). The figures come from ``mom_dist.plan.efficiency``.
"""

from __future__ import annotations

import json
import os

from mom_dist.config import Config, load_config
from mom_dist.plan.efficiency import Efficiency, efficiency
from mom_dist.plan.traffic import RoutingProfile, read_routing

GIB = 2 ** 30

COUNTED = ("FLOPs: every matmul per token as torch's FlopCounterMode counts it (projections of blocks and picked "
           "modules, routers, tied LM head, one-hot gathers of module LayerNorm affine and biases, attention QK^T and "
           "AV with every query against every key - a causal kernel skips about half of that part, column 'attn "
           "core'); not counted: LayerNorm, GELU, softmax, residual adds, dispatch gathers and scatters, the losses. "
           "Training = forward + backward (+ the recomputed forward with activation checkpointing).")
MEMORY = ("Memory: forward activations = what one training forward of the batch keeps for backward (autograd's "
          "saved tensors, checkpoint inputs, logits, fp32 log-softmax); training = one GPU, ep_size 1, ZeRO 0: "
          "weights + gradients + optimizer (AdamW states, + fp32 master weights and gradients in bf16: 20 bytes "
          "per parameter against fp32's 16) + forward activations + the fp32 logit-gradient temporaries. KV cache "
          "= the keys and values generation caches for the batch (one cache per attention that runs: dense blocks "
          "and routing steps).")


def load_entry(path: str, overrides: list[str]) -> tuple[str, Config, RoutingProfile | None]:
    """A config YAML, or a training run directory: its config.json and its measured routing."""
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"'{path}' is a directory without config.json; pass a config YAML or a training "
                             "run's out_dir")
        cfg = _load(cfg_path, overrides)
        return name, cfg, read_routing(path, cfg.model, label=path)
    if not os.path.isfile(path):
        raise ValueError(f"config file '{path}' does not exist; pass one under configs/ (e.g. configs/paper/"
                         "gpt2-large.yaml) or a training run directory")
    return name, _load(path, overrides), None


def _load(path: str, overrides: list[str]) -> Config:
    try:
        return load_config(path, overrides)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {str(err).splitlines()[0]}") from None


def compare(entries: list[tuple[str, Config, RoutingProfile | None]], batch: int, seq_len: int,
            checkpointing: bool | None = None) -> list[Efficiency]:
    for name, cfg, _ in entries:
        if seq_len > cfg.model.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} exceeds {name}'s model.max_seq_len={cfg.model.max_seq_len}; "
                             "compare at a shorter sequence")
    return [efficiency(cfg.model, batch, seq_len, name=name, checkpointing=checkpointing, profile=profile)
            for name, cfg, profile in entries]


COLUMNS = ["model", "params M", "activated M", "depth", "modules/token", "fwd GFLOP/token", "attn core",
           "fwd TFLOP/batch", "train GFLOP/token", "AC", "fwd act GiB bf16", "fwd act GiB fp32", "train GiB bf16",
           "train GiB fp32", "KV cache GiB bf16", "vs first: depth", "fwd FLOPs", "fwd act", "KV cache"]


def _rel(x: float, base: float) -> str:
    return f"{x / base - 1:+.0%}" if base else "-"


def _num(x: float, decimals: int) -> str:
    """Fixed decimals at paper scale; three significant digits for the small models of tests."""
    return f"{x:,.{decimals}f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


def row(e: Efficiency, first: Efficiency) -> list[str]:
    f = e.forward_flops
    return [e.name, _num(e.params_total / 1e6, 1), _num(e.params_activated / 1e6, 1), str(e.depth),
            f"{e.modules_per_token:.1f}", _num(f.total / 1e9, 3), f"{f.attention_core / f.total:.0%}",
            _num(f.total * e.tokens / 1e12, 2), _num(e.training_flops.total / 1e9, 3),
            "on" if e.checkpointing else "off",
            _num(e.bf16.forward_activations / GIB, 2), _num(e.fp32.forward_activations / GIB, 2),
            _num(e.bf16.training / GIB, 2), _num(e.fp32.training / GIB, 2), _num(e.bf16.kv_cache / GIB, 2),
            _rel(e.depth, first.depth), _rel(f.total, first.forward_flops.total),
            _rel(e.bf16.forward_activations, first.bf16.forward_activations),
            _rel(e.bf16.kv_cache, first.bf16.kv_cache)]


def notes(rows: list[Efficiency]) -> list[str]:
    out = [f"batch {rows[0].batch} x {rows[0].seq_len} tokens; 'vs first' compares with {rows[0].name}; "
           "activated = weights a token's forward multiplies with (a module once per pass through it); "
           "modules/token = attention + FFN modules on a token's path", COUNTED, MEMORY]
    for e in rows:
        if e.skip_source == "none":
            continue
        out.append(f"{e.name}: SKIP as measured by {e.skip_source}: {e.skip_attn:.1%} of attention and "
                   f"{e.skip_ffn:.1%} of FFN picks, which cost nothing here (dropless expert-parallel dispatch); "
                   f"forward memory with SKIP is an estimate (module rows scaled). At ep_size 1 the local dispatcher "
                   f"computes SKIP picks as padding rows: {_num(e.ep1_forward_flops / 1e9, 3)} GFLOP/token forward, "
                   f"{_num(e.ep1_forward_activations_bf16 / GIB, 2)} GiB forward activations in bf16.")
    return out


def render(rows: list[Efficiency], fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps({"batch": rows[0].batch, "seq_len": rows[0].seq_len, "flops_counted": COUNTED,
                           "memory": MEMORY, "models": [e.to_dict() for e in rows]}, indent=2)
    cells = [row(e, rows[0]) for e in rows]
    lines = []
    if fmt == "markdown":
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|---|" + "|".join("---:" for _ in COLUMNS[1:]) + "|")
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        lines += [""] + [f"- {x}" for x in notes(rows)]
    else:
        widths = [max(len(COLUMNS[i]), *(len(c[i]) for c in cells)) for i in range(len(COLUMNS))]
        fmt_row = lambda c: "  ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                                      for i, (x, w) in enumerate(zip(c, widths))).rstrip()
        lines += [fmt_row(COLUMNS)] + [fmt_row(c) for c in cells]
        lines += [""] + [f"- {x}" for x in notes(rows)]
    return "\n".join(lines)
