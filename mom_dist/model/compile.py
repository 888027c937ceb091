"""``torch.compile`` of a MoM model (the ``train.compile`` option), applied from outside.

    if compile_wanted(cfg.train.compile, device):
        compile_model(model, cfg.train.compile_backend)   # in place; compiles at the first call
    ...
    log(compile_summary())    # "torch.compile: 1 graph, 0 graph breaks, 0 recompiles"

What makes every path one graph (no graph break, no recompilation when routing changes):
- the pools' grouped matmul is a custom op where Dynamo cannot trace it (fp32, the loop
  fallback): ``mom_dist.model.grouped_ops``;
- the expert-parallel all-to-all is a custom op (``mom_dist.parallel.all_to_all``);
- the dropless all-to-all plan reads its split sizes on the host (``.tolist()``); with
  ``capture_scalar_outputs`` Dynamo traces them as *unbacked* symbolic sizes instead of
  breaking the graph and recompiling for every new size;
- no traced shape depends on routing otherwise: local plans sort all T*K picks (SKIP last)
  instead of filtering them, capacity buffers are (N, capacity), and the all-to-all's byte
  counter is a tensor (an int attribute would be guarded on and recompile every step).

A new input shape (another micro-batch size, evaluation's last batch) or train/eval mode
compiles once more; Dynamo's own limit (``recompile_limit``, 8 per function) bounds that.

``compile_model`` uses ``nn.Module.compile``: the module is compiled in place, so parameter
names, state dicts, checkpoints and DeepSpeed's engine see the plain model.
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_BACKENDS = ("inductor", "aot_eager")


def compile_wanted(choice: str, device) -> bool:
    """``auto``: on with CUDA (2.1x on an H200), off elsewhere: on 2 CPU cores a first compile
    takes about a minute and gains 0-20% at d >= 256 (benchmarks/results/compile.md)."""
    return choice == "on" or (choice == "auto" and torch.device(device).type == "cuda")


def compile_model(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile ``module``'s forward (and through AOTAutograd its backward) in place."""
    # The dropless all-to-all plan's host read becomes unbacked sizes, not a graph break (above).
    # A process-wide Dynamo setting: it only turns graph breaks into traced scalars.
    torch._dynamo.config.capture_scalar_outputs = True
    module.compile(backend=backend)
    return module


def compile_stats() -> dict:
    """Dynamo's counters for this process: graphs compiled, graph breaks (with their reasons)
    and recompilations (compiles of a function that already had a graph)."""
    from torch._dynamo import utils

    breaks = dict(utils.counters["graph_break"])
    metrics = utils.get_compilation_metrics() if hasattr(utils, "get_compilation_metrics") else []
    recompiles = sum(1 for m in metrics if getattr(m, "recompile_reason", None))
    return {"graphs": utils.counters["stats"].get("unique_graphs", 0), "graph_breaks": sum(breaks.values()),
            "recompiles": recompiles,
            "break_reasons": {why.splitlines()[0][:160]: n for why, n in breaks.items()}}


def reset_compiler() -> None:
    """Forget every compiled graph and zero the counters (benchmarks and tests compile several
    models in one process)."""
    from torch._dynamo import utils

    torch._dynamo.reset()
    utils.counters.clear()
    if hasattr(utils, "clear_compilation_metrics"):
        utils.clear_compilation_metrics()


def compile_summary(stats: dict | None = None) -> str:
    """One log line from ``compile_stats()``."""
    s = stats or compile_stats()
    line = (f"torch.compile: {s['graphs']} graph(s), {s['graph_breaks']} graph break(s), "
            f"{s['recompiles']} recompile(s)")
    if s["break_reasons"]:
        line += "; breaks: " + "; ".join(f"{n}x {why}" for why, n in s["break_reasons"].items())
    return line
