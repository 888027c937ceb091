"""``mom-finetune``: fine-tune a MoM on a downstream task and evaluate it (GLUE, XSUM, your own).

    mom-finetune SOURCE --task sst2 --train train.jsonl --eval dev.jsonl -o OUT_DIR
    mom-finetune SOURCE --task xsum --train train.parquet --eval valid.parquet -o OUT_DIR
    mom-finetune SOURCE --task classification --text-fields question,passage --label-field answer \\
                 --num-labels 2 --train a.csv --eval b.csv -o OUT_DIR --set train.steps=2000
    torchrun --nproc_per_node 8 -m mom_dist.cli.finetune SOURCE ... --set parallel.ep_size=4

SOURCE is a training run directory (any layout) or an exported directory (``mom-convert
export``/``from-release``); the tokenizer is its ``tokenizer.model`` or the run's (its
data.tokenizer_model, found from any directory), else --tokenizer (which may not replace the
tokenizer SOURCE records with another one). Presets: cola sst2 mrpc qqp stsb mnli qnli rte wnli (GLUE
field layouts and metrics) and xsum (document/summary, ROUGE-1/2/L). ``--set`` overrides
train.* (steps, lr, batch sizes, seq_len, precision, seed...), parallel.* (ep_size, zero_stage,
...) and non-architecture model.* options (dropout, loss coefficients). Writes
OUT_DIR/eval_results.json, predictions.jsonl, metrics.jsonl and OUT_DIR/model/ (the fine-tuned
model with its tokenizer and task head: ``mom-convert to-hf OUT_DIR/model`` makes it a
transformers sequence classifier).
"""

from __future__ import annotations

import argparse
import sys

from mom_dist.exit_codes import BAD_INPUT, FINISHED


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-finetune", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("source")
    ap.add_argument("--task", required=True, help="a preset (sst2, mrpc, ..., xsum) or classification|regression|summarization")
    ap.add_argument("--train", required=True, help="training file (.json/.jsonl/.csv/.tsv/.parquet)")
    ap.add_argument("--eval", required=True, help="evaluation file (same formats)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--tokenizer", default=None, help="SentencePiece .model, when SOURCE records none "
                    "(else it must be the same tokenizer)")
    ap.add_argument("--text-fields", default=None, help="comma-separated text columns (one or two)")
    ap.add_argument("--label-field", default=None)
    ap.add_argument("--num-labels", type=int, default=None)
    ap.add_argument("--source-field", default=None)
    ap.add_argument("--target-field", default=None)
    ap.add_argument("--prompt", default=None, help="summarisation prompt between document and summary")
    ap.add_argument("--max-target-len", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--eval-batch-size", type=int, default=None)
    ap.add_argument("--max-eval-examples", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)

    from mom_dist.evaluate import finetune as ft
    from mom_dist.evaluate.tasks import KINDS, TaskConfig
    from mom_dist.parallel.runtime import LaunchError, shutdown

    preset = None if args.task in KINDS else args.task
    try:
        task = TaskConfig.build(
            preset, kind=None if preset else args.task, train_file=args.train, eval_file=args.eval,
            text_fields=args.text_fields.split(",") if args.text_fields else None, label_field=args.label_field,
            num_labels=args.num_labels, source_field=args.source_field, target_field=args.target_field,
            prompt=args.prompt, max_target_len=args.max_target_len, max_new_tokens=args.max_new_tokens,
            eval_batch_size=args.eval_batch_size, max_eval_examples=args.max_eval_examples)
        prepared = ft.prepare(args.source, task, args.output, args.overrides, tokenizer=args.tokenizer,
                              overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"mom-finetune: error: {e}", file=sys.stderr)
        return BAD_INPUT
    try:
        result = ft.finetune(prepared)
    except (ValueError, LaunchError) as e:
        print(f"mom-finetune: error: {e}", file=sys.stderr)
        shutdown(BAD_INPUT)
    import torch.distributed as dist

    if dist.get_rank() == 0:  # the done line once, from rank 0
        print("mom-finetune: done: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
              + f"; results in {args.output}/eval_results.json", flush=True)
    shutdown(FINISHED)


if __name__ == "__main__":
    sys.exit(main())
