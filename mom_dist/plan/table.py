"""Render a ``Plan`` as a text table (terminal) or markdown (docs, benchmarks/results)."""

from __future__ import annotations

from mom_dist.plan.planner import Layout, Plan

GIB, MIB = 2 ** 30, 2 ** 20

COLUMNS = ["", "EP", "EDP", "ZeRO", "micro", "accum", "AC", "params GiB", "grads GiB", "optim GiB", "activ GiB",
           "total GiB", "fits", "a2a MiB/step", "grad MiB/step", "compute s", "a2a s", "grad s", "step s", "tokens/s",
           "notes"]


def row(plan: Plan, lay: Layout, recommended: bool) -> list[str]:
    mem = lay.memory
    return ["*" if recommended else "", str(lay.ep), str(lay.edp), str(lay.zero), str(lay.micro_batch),
            str(lay.accumulation), "on" if lay.checkpointing else "off",
            f"{mem.params / GIB:.2f}", f"{mem.grads / GIB:.2f}", f"{mem.optimizer / GIB:.2f}",
            f"{mem.activations / GIB:.2f}", f"{mem.total / GIB:.2f}", "yes" if lay.fits else "NO",
            f"{lay.a2a_bytes_step / MIB:,.1f}", f"{lay.grad_bytes_step / MIB:,.1f}", f"{lay.compute_s:.3f}",
            f"{lay.a2a_s:.3f}", f"{lay.grad_s:.3f}", f"{lay.step_s:.3f}", f"{plan.tokens_per_s(lay):,.0f}",
            "; ".join(lay.notes)]


def header(plan: Plan, config_name: str) -> list[str]:
    c, n = plan.cluster, plan.counts
    return [
        f"model {config_name}: {n.total / 1e6:,.1f}M parameters ({n.module / 1e6:,.1f}M in module pools, "
        f"{n.non_module / 1e6:,.1f}M elsewhere); {plan.precision}, global batch {plan.global_batch} x "
        f"{plan.seq_len} tokens",
        f"cluster {c.label()}: {c.nodes} node(s) x {c.gpus_per_node} GPUs = {c.world}, {c.gpu_memory_gb:g} GiB, "
        f"{c.peak_bf16_tflops:g} TFLOP/s bf16, {c.intra_node_gbps:g} / {c.inter_node_gbps:g} Gbit/s intra / inter node",
        f"{len(plan.layouts)} valid layouts ({sum(lay.fits for lay in plan.layouts)} fit in memory)"
        + "".join(f"; refused: {reason}" for reason in plan.rejected),
    ]


def recommendation(plan: Plan) -> str:
    best = plan.recommended
    if best is None:
        return ("recommended: none - no valid layout fits in memory; use more GPUs, bf16, activation "
                "checkpointing or a smaller model")
    return (f"recommended: parallel.ep_size={best.ep} parallel.zero_stage={best.zero} "
            f"train.micro_batch_size={best.micro_batch} model.activation_checkpointing="
            f"{'true' if best.checkpointing else 'false'} (accumulation {best.accumulation}, "
            f"{best.memory.total / GIB:.1f} GiB per GPU, {best.step_s:.3f} s per step, "
            f"{plan.tokens_per_s(best):,.0f} tokens/s)")


def render(plan: Plan, config_name: str, *, markdown: bool = False, limit: int | None = None,
           ep: int | None = None) -> str:
    best = plan.recommended
    listed = [lay for lay in plan.layouts if ep is None or lay.ep == ep]
    shown = listed if limit is None else listed[:limit]
    if best is not None and best not in shown:
        shown = [best] + shown
    rows = [row(plan, lay, lay is best) for lay in shown]
    lines = [*header(plan, config_name), ""]
    if markdown:
        lines = [f"- {x}" for x in header(plan, config_name)] + [""]
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "|".join("---" if i in (0, len(COLUMNS) - 1) else "---:" for i in range(len(COLUMNS))) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(COLUMNS[i]), *(len(r[i]) for r in rows)) if rows else len(COLUMNS[i])
                  for i in range(len(COLUMNS))]
        fmt = lambda cells: "  ".join(c.rjust(w) if 0 < i < len(cells) - 1 else c.ljust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        lines.append(fmt(COLUMNS))
        lines += [fmt(r) for r in rows]
    hidden = len(plan.layouts) - len(set(map(id, shown)))
    if hidden:
        lines.append(f"({hidden} more layouts not shown; --limit 0 shows all)")
    lines += ["", recommendation(plan), "", "assumptions:"]
    lines += [f"{'-' if markdown else ' -'} {x}" for x in plan.assumptions.lines(plan.cluster, plan.profile)]
    lines += [f"{'-' if markdown else ' -'} checked against measured runs (tests/plan): parameter counts, "
              "parameter + master + AdamW state bytes, all-to-all bytes; estimates: gradients, activations, times"]
    return "\n".join(lines)
