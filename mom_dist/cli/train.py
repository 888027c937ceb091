"""``mom-train``: train a MoM (one process, torchrun, deepspeed, mpirun or srun launch).

    mom-train --config configs/tiny.yaml [--set train.steps=100 --set parallel.ep_size=2 ...]

Every config field can be overridden with ``--set section.key=value`` (YAML values).

Exit status (mom_dist.exit_codes; launchers/README.md): 0 finished (or train.stop_after
reached, with a checkpoint), 75 preempted by SIGUSR1/SIGTERM (state saved, or nothing to save
yet: requeue), 3 diverged, 4 a collective timed out (a rank stopped answering), 2 bad
config/data/launch environment, 1 a full disk (one line) or anything else (a traceback). Rank 0 prints exactly one closing line saying
which (``mom-train: done: ...`` only for a finished run); a failing rank prints
``mom-train: rank R/W on host H (pid P) failed: ...``. With MOM_DIST_EXIT_FILE set, rank 0 also
writes ``<code> <checkpoint path>`` there for the launcher (launchers/slurm.sbatch).
"""

from __future__ import annotations

import sys

# Signals first: a preemption that arrives while torch and DeepSpeed import (seconds) must not
# kill the job (lifecycle imports only the standard library).
from mom_dist.train import lifecycle  # noqa: E402  (before anything heavy, on purpose)

lifecycle.arm("mom-train")

import argparse  # noqa: E402
import os  # noqa: E402
import traceback  # noqa: E402

from mom_dist import exit_codes  # noqa: E402


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0") or 0) if os.environ.get("RANK", "0").isdigit() else 0


def _leave(code: int, line: str | None, checkpoint: str | None = None, together: bool = False) -> int:
    """Rank 0 prints ``line`` (and records the outcome for the launcher); every rank exits ``code``."""
    if _rank() == 0:
        if line:
            print(line, file=sys.stdout if code == 0 else sys.stderr, flush=True)
        exit_file = os.environ.get("MOM_DIST_EXIT_FILE")
        if exit_file:
            try:
                with open(exit_file, "w") as f:
                    f.write(f"{code} {checkpoint or ''}\n")
            except OSError as e:
                print(f"mom-train: note: cannot write MOM_DIST_EXIT_FILE={exit_file}: {e}", file=sys.stderr)
    if "torch" in sys.modules:  # the process group may exist: leave through the runtime
        from mom_dist.parallel.runtime import shutdown

        shutdown(code, together=together)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _closing(cfg, result) -> tuple[int, str, str | None]:
    """(exit code, rank 0's closing line, checkpoint path) for a train() that returned."""
    t = cfg.train
    ckpt = os.path.join(t.out_dir, "checkpoints", result.checkpoint) if result.checkpoint else None
    if result.stop is None and result.ran == 0:  # relaunched after the end: nothing was trained
        from mom_dist.checkpoint.layout import checkpoints_dir, read_latest

        tag = read_latest(checkpoints_dir(t.out_dir))
        ckpt = os.path.join(checkpoints_dir(t.out_dir), tag) if tag else None
        loss = f"; its recorded loss {result.final_loss:.4f}" if result.final_loss == result.final_loss else ""
        return (exit_codes.FINISHED, f"mom-train: done: no step ran: the checkpoint in {t.out_dir} is at step "
                f"{result.steps_done}, train.steps={t.steps}{loss}; raise train.steps to train further", ckpt)
    if result.stop is None:
        return (exit_codes.FINISHED, f"mom-train: done: {result.steps_done} steps, final loss {result.final_loss:.4f}"
                + (f", validation perplexity {result.valid_ppl:.2f}" if result.valid_ppl else ""), ckpt)
    where = f"step {result.steps_done}/{t.steps}"
    saved = (f"checkpoint {ckpt}" if ckpt else
             "no checkpoint (train.save_interval=0), so a rerun starts over")
    if result.stop == "stop_after":
        return (exit_codes.FINISHED, f"mom-train: stopped at {where} (train.stop_after={t.stop_after}): {saved}; "
                "run the same command again to continue", ckpt)
    return (exit_codes.PREEMPTED, f"mom-train: preempted ({lifecycle.signalled() or 'signal on another rank'}) "
            f"at {where}: {saved}; requeue or rerun the same command to resume", ckpt)


def main(argv=None) -> int:
    lifecycle.arm("mom-train")  # no-op when the import above did it; main() may be called directly
    ap = argparse.ArgumentParser(prog="mom-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set model.n_steps=4 (repeatable)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)

    from mom_dist.config import load_config
    from mom_dist.parallel import health
    from mom_dist.parallel.runtime import LaunchError

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"mom-train: config error: {e}", file=sys.stderr)
        return _leave(exit_codes.BAD_INPUT, None)
    # A signal from here on is acted on at the trainer's first safe point, where all ranks agree
    # (a rank leaving alone would leave the others waiting in the rendezvous).
    try:
        from mom_dist.train.trainer import train

        result = train(cfg)
    except lifecycle.PreemptedDuringSetup as e:
        after = (f"nothing trained since checkpoint {e.checkpoint}; the requeued job resumes from it"
                 if e.checkpoint else "no checkpoint yet; the requeued job starts over")
        return _leave(exit_codes.PREEMPTED, f"mom-train: preempted ({e.signal_name}) during {e.where}: {after}",
                      together=True)
    except exit_codes.TrainingDiverged as e:
        return _leave(exit_codes.DIVERGED, f"mom-train: diverged: {e}", together=True)
    except exit_codes.DiskFull as e:  # every rank learns it from the save (an environment failure)
        return _leave(exit_codes.FAILED, f"mom-train: error: {e}", together=True)
    except (ValueError, LaunchError) as e:
        print(f"mom-train: error: {e}", file=sys.stderr, flush=True)
        return _leave(exit_codes.BAD_INPUT, None)
    except KeyboardInterrupt as e:
        lifecycle.report_failure(e)
        return _leave(130, None)
    except BaseException as e:  # noqa: BLE001  (every failure leaves one line naming this rank)
        kind = health.classify(e)
        if kind:
            silent, why = health.silent_ranks()
            what = (f"a collective timed out after parallel.collective_timeout_s={cfg.parallel.collective_timeout_s:g} s"
                    if kind == "timeout" else "a peer closed its connection")
            print(f"mom-train: {lifecycle.identity()} failed: {what}: {why} "
                  f"[{str(e).strip().splitlines()[0][:200]}]", file=sys.stderr, flush=True)
            return _leave(exit_codes.COLLECTIVE_TIMEOUT if kind == "timeout" else exit_codes.FAILED, None)
        traceback.print_exc()
        lifecycle.report_failure(e)
        return _leave(exit_codes.FAILED, None)
    code, line, ckpt = _closing(cfg, result)
    return _leave(code, line, ckpt, together=True)


if __name__ == "__main__":
    sys.exit(main())
