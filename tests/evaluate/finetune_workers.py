"""Worker functions for the fine-tuning tests, run in real processes (one per rank, gloo)."""

from __future__ import annotations

from mom_dist.parallel.local_launch import worker_main


def finetune_runs(args: dict) -> dict:
    """Fine-tune each run in turn in this process group; return losses, metrics, predictions."""
    from mom_dist.evaluate import finetune as ft
    from mom_dist.evaluate.tasks import TaskConfig
    from mom_dist.model.compile import compile_stats, reset_compiler

    results = {}
    for run in args["runs"]:
        task = TaskConfig.build(run.get("preset"), **run.get("task", {}))
        prepared = ft.prepare(args["source"], task, run["out"], run["overrides"])
        res = ft.finetune(prepared, log=lambda *a: None)
        results[run["name"]] = {k: res[k] for k in ("train_losses", "metrics", "predictions")}
        results[run["name"]]["compile"] = compile_stats()  # graphs: 0 unless train.compile is on
        reset_compiler()
    return results


if __name__ == "__main__":
    worker_main(globals())
