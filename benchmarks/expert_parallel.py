"""Benchmarks of expert parallelism (issue 3), in real gloo processes on CPU; prints markdown tables.

  A. All-to-all bytes per routing step, measured vs the theoretical minimum for the observed
     routing (dropless: must be equal), and the capacity mode's padding overhead.
  B. Per-rank parameter + optimizer-state memory for EP in {1,2,4} x ZeRO in {0,1,2} (world 4),
     fp32 and bf16, vs the analytical formula (target: within 5%).
  C. Host-sync ops per routing step of a training forward + backward through the all-to-all
     dispatcher (target: <= 2 dropless, 0 capacity).
  D. Training step time EP=1 vs EP=2 on 2 CPU ranks (DeepSpeed engine, ZeRO 1).

Each part starts its own ranks (``benchmarks/_ep_worker.py``, one process per rank, gloo on
127.0.0.1, OMP_NUM_THREADS=1) the way ``tests/dist_utils.run_workers`` does. Definitions of
every quantity are printed with the tables; results and interpretation live in
``benchmarks/results/expert_parallel.md``. No timed assertions anywhere: this only reports.

Run:  TORCH_EXTENSIONS_DIR=.venv/torch_extensions .venv/bin/python benchmarks/expert_parallel.py
      (about 2-4 minutes on 2 shared cores; ``--parts AB`` runs a subset; ``--help``)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mom_dist.parallel import local_launch  # noqa: E402
import _machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

WORKER = os.path.join(ROOT, "benchmarks", "_ep_worker.py")

# Small models: the quantities in A-C are counts and bytes, exact at any size.
SMALL = dict(vocab=512, seq=64, d_model=64, heads=4, bottom=1, top=1, modules=4, steps=4, router_dim=32, batch=4)
# A modest model for step time (D): 1,024 tokens per rank per step.
MODEST = dict(vocab=4096, seq=256, d_model=256, heads=4, bottom=1, top=1, modules=4, steps=4, router_dim=64,
              batch=4, k_attn=1, k_ffn=2)


# ----------------------------------------------------------------------------- launching
def run_ranks(fn: str, world: int, args: dict, timeout: int = 600) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return local_launch.run_ranks(WORKER, fn, world, args, tmp, timeout)
        except local_launch.RankFailure as e:
            raise SystemExit(str(e))


def _kib(b: float) -> str:
    return f"{b / 1024:,.1f}"


# ----------------------------------------------------------------------------- A. bytes
A2A_CASES = [
    dict(name="ep2-K1-dropless", ep=2, k=1), dict(name="ep2-K2-dropless", ep=2, k=2),
    dict(name="ep4-K1-dropless", ep=4, k=1), dict(name="ep4-K2-dropless", ep=4, k=2),
    dict(name="ep4-K2-dropless-AC", ep=4, k=2, ac=True),
    dict(name="ep2-K2-cap1.25", ep=2, k=2, cf=1.25),
    dict(name="ep4-K1-cap1.0", ep=4, k=1, cf=1.0), dict(name="ep4-K1-cap1.25", ep=4, k=1, cf=1.25),
    dict(name="ep4-K2-cap1.25", ep=4, k=2, cf=1.25), dict(name="ep4-K2-cap2.0", ep=4, k=2, cf=2.0),
]


def part_a(world: int) -> str:
    res = run_ranks("a2a_bytes", world, dict(model=SMALL, cases=A2A_CASES))
    rows = ["| case | tokens/rank | min KiB | `bytes_sent` KiB | sent / min | wire fwd payload KiB | "
            "wire fwd control KiB | wire bwd KiB | `bytes_sent` - wire fwd payload | own-rank pick weights KiB | "
            "real-pair KiB | padding overhead | dropped pairs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in A2A_CASES:
        per = [r[case["name"]] for r in res]
        steps = per[0]["routing_steps"]
        norm = world * steps  # per rank per routing step (means over ranks)
        tot = {k: sum(p[k] for p in per) for k in per[0] if isinstance(per[0][k], (int, float))}
        cap = "cf" in case
        pad = f"{tot['bytes_sent'] / tot['real_pair_bytes']:.2f}x" if cap and tot["real_pair_bytes"] else "-"
        real = _kib(tot["real_pair_bytes"] / norm) if cap else "-"
        own = "-" if cap else _kib(tot["own_weight_bytes"] / norm)
        drop = f"{tot['dropped']} / {tot['real_pairs']} ({100 * tot['dropped'] / max(1, tot['real_pairs']):.1f}%)" \
            if cap else "0"
        rows.append(f"| {case['name']} | {per[0]['tokens']} | {_kib(tot['min_bytes'] / norm)} | "
                    f"{_kib(tot['bytes_sent'] / norm)} | {tot['bytes_sent'] / tot['min_bytes']:.3f} | "
                    f"{_kib(tot['wire_fwd_payload'] / norm)} | {_kib(tot['wire_fwd_control'] / norm)} | "
                    f"{_kib((tot['wire_bwd_payload'] + tot['wire_bwd_control']) / norm)} | "
                    f"{_kib((tot['bytes_sent'] - tot['wire_fwd_payload']) / norm)} | {own} | {real} | {pad} | {drop} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- B. memory
def formula(p_total: int, p_module: int, ep: int, zero: int, world: int, precision: str) -> dict:
    """Analytical per-rank bytes with AdamW.

    P_n = non-module parameters (replicated on every rank), P_m = module parameters of all
    pools; a rank holds P_n + P_m/EP parameters (4 bytes each in fp32, 2 in bf16).
    ZeRO 0: exp_avg and exp_avg_sq (8 bytes) for every held parameter, plus a full fp32 master
    copy (4 bytes) in bf16 (DeepSpeed's FP16_UnfusedOptimizer); none in fp32.
    ZeRO 1/2: an fp32 master partition (4 bytes) plus exp_avg/exp_avg_sq (8 bytes) of P_n/DP
    non-module parameters (DP = world) and of (P_m/EP)/EDP module parameters (EDP = world/EP),
    i.e. 12 (P_n + P_m)/world bytes: the module share is P_m/world whatever EP is. (In fp32,
    DeepSpeed's ZeRO master partition is a separate clone of the fp32 weights.)
    """
    p_n, p_m = p_total - p_module, p_module
    held = p_n + p_m / ep
    width = 2 if precision == "bf16" else 4
    if zero == 0:
        part, master = held, 4 * held if precision == "bf16" else 0
    else:
        part = p_n / world + (p_m / ep) / (world // ep)
        master = 4 * part
    return dict(params=width * held, master=master, states=8 * part)


def part_b(world: int, precision: str) -> str:
    res = run_ranks("memory", world, dict(model=SMALL, eps=[1, 2, 4], zeros=[0, 1, 2], precision=precision))
    first = next(iter(res[0].values()))
    head = (f"Model: P_total = {first['p_total']:,} parameters, of which module (pool) P_m = {first['p_module']:,} "
            f"and non-module P_n = {first['p_total'] - first['p_module']:,}; {precision}, torch AdamW wrapped by "
            f"DeepSpeed; world {world}. Bytes per rank (mean over ranks; ranks differ only by padding).")
    rows = [head, "",
            "| EP | ZeRO | DS optimizer | params KiB (module + other) | formula | master KiB | formula | "
            "AdamW states KiB (module + other) | formula | total KiB | formula | total / formula |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for key in res[0]:
        r0 = res[0][key]
        ep, zero = r0["ep"], r0["zero"]
        mean = lambda cat: statistics.mean(r[key]["held"].get(cat, 0) for r in res)  # noqa: E731
        pm, po = mean("params_module"), mean("params_other")
        mm, mo = mean("master_module"), mean("master_other")
        sm, so = mean("states_module"), mean("states_other")
        f = formula(r0["p_total"], r0["p_module"], ep, zero, world, precision)
        total, ftotal = pm + po + mm + mo + sm + so, sum(f.values())
        worst = max(worst, abs(total / ftotal - 1))
        rows.append(f"| {ep} | {zero} | {r0['optimizer']} | {_kib(pm + po)} ({_kib(pm)} + {_kib(po)}) | "
                    f"{_kib(f['params'])} | {_kib(mm + mo)} | {_kib(f['master'])} | {_kib(sm + so)} "
                    f"({_kib(sm)} + {_kib(so)}) | {_kib(f['states'])} | {_kib(total)} | {_kib(ftotal)} | "
                    f"{total / ftotal:.4f} |")
    rows += ["", f"Largest deviation of a total from the formula: {100 * worst:.2f}% (target <= 5%)."]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- C. host syncs
SYNC_CASES = [
    dict(name="ep1-K2-local (reference)", ep=1, k=2),
    dict(name="ep2-K1-dropless", ep=2, k=1), dict(name="ep2-K2-dropless", ep=2, k=2),
    dict(name="ep2-K2-dropless-AC", ep=2, k=2, ac=True),
    dict(name="ep2-K2-cap1.25", ep=2, k=2, cf=1.25), dict(name="ep2-K2-cap1.25-AC", ep=2, k=2, cf=1.25, ac=True),
]


def part_c(world: int) -> str:
    res = run_ranks("host_syncs", world, dict(model=SMALL, cases=SYNC_CASES))
    rows = ["| case | syncs fwd (rank 0) | syncs bwd | per routing step | ops | blocking H2D copies per routing step "
            "(`torch.tensor(list, device=dev)`, fwd + bwd) |",
            "|---|---:|---:|---:|---|---:|"]
    for case in SYNC_CASES:
        r = res[0][case["name"]]
        if any(x[case["name"]] != r for x in res[1:]):
            r_note = " (ranks differ)"
        else:
            r_note = ""
        steps = r["routing_steps"]
        fwd, bwd = sum(r["fwd"].values()), sum(r["bwd"].values())
        ops = {}
        for phase in ("fwd", "bwd"):
            for k, v in r[phase].items():
                ops[k] = ops.get(k, 0) + v
        ops_s = ", ".join(f"`{k}` {v}" for k, v in sorted(ops.items())) or "none"
        hd = (r["host_data_fwd"] + r["host_data_bwd"]) / steps
        rows.append(f"| {case['name']}{r_note} | {fwd} | {bwd} | {(fwd + bwd) / steps:.2f} | {ops_s} | {hd:.2f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- D. step time
def part_d(world: int, rounds: int) -> str:
    res = run_ranks("step_time", world, dict(model=MODEST, eps=[1, 2], zero=1, warmup=2, rounds=rounds))
    tokens = MODEST["batch"] * MODEST["seq"] * world
    rows = [f"World {world}, {tokens:,} tokens per step ({MODEST['batch']} x {MODEST['seq']} per rank), ZeRO 1, fp32, "
            f"grouped GEMM on; {rounds} timed rounds after 2 warm-up rounds, EP=1 and EP=2 alternating.", "",
            "| EP | step s median | min..max | tokens/s (median) | tokens/s (min step) | in all_to_all_single s "
            "(median, rank mean) | loss (first..last) |",
            "|---:|---:|---:|---:|---:|---:|---|"]
    for ep in ("1", "2"):
        t = [max(r["times"][ep][i] for r in res) for i in range(rounds)]  # barrier-bounded, ~equal per rank
        med = statistics.median(t)
        losses = res[0]["losses"][ep]
        a2a = statistics.median(statistics.mean(r["a2a_s"][ep][i] for r in res) for i in range(rounds))
        rows.append(f"| {ep} | {med:.3f} | {min(t):.2f}..{max(t):.2f} | {tokens / med:,.0f} | {tokens / min(t):,.0f} | "
                    f"{a2a:.3f} | {losses[0]:.4f}..{losses[-1]:.4f} |")
    return "\n".join(rows)


def settings() -> str:
    return (f"{_machine.describe()}; one process per rank, gloo, OMP_NUM_THREADS=1\n"
            f"small model (A-C): {SMALL}\nmodest model (D): {MODEST}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="ABCD", help="which parts to run, e.g. AB")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds of part D")
    args = ap.parse_args()
    load0, t0 = os.getloadavg(), time.time()
    out = []
    parts = {"A": ("A. All-to-all bytes per rank per routing step (world 4)", lambda: part_a(4)),
             "B": ("B. Per-rank parameter + optimizer-state memory (world 4)",
                   lambda: part_b(4, "fp32") + "\n\n### bf16\n\n" + part_b(4, "bf16")),
             "C": ("C. Host syncs per routing step, training forward + backward (world 2)", lambda: part_c(2)),
             "D": ("D. Training step time, EP=1 vs EP=2 (world 2)", lambda: part_d(2, args.rounds))}
    for key in args.parts.upper():
        title, fn = parts[key]
        t = time.time()
        print(f"running {title} ...", file=sys.stderr, flush=True)
        out.append(f"## {title}\n\n{fn()}\n\n({time.time() - t:.0f} s)")
    load1 = os.getloadavg()
    print(settings())
    print(f"load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
          f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; total {time.time() - t0:.0f} s\n")
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
