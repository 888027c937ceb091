"""`mom-preprocess`: tokenize a corpus into megatron-core .bin/.idx files, or verify them.

    mom-preprocess INPUT... --output-prefix data/owt [--vocab-size 32000] [--workers 8]
    mom-preprocess --verify data/owt_train_text_document [--tokenizer-model M.model]

All logic lives in `mom_dist.data.preprocess` and `mom_dist.data.indexed`; this only parses
arguments and turns known errors into one line `mom-preprocess: error: ...`: exit 2 for bad
input, arguments or data (nothing is left behind, previous outputs are intact), exit 1 for
failures on the output side (disk full: the work directory is kept, rerun to resume).
"""
from __future__ import annotations

import argparse
import json
import sys

from mom_dist.exit_codes import BAD_INPUT, FAILED, FINISHED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mom-preprocess",
        description="Tokenize text corpora (OpenWebText layout, .txt dirs, JSON lines, parquet, "
        "saved datasets, hub:NAME) into megatron-core indexed datasets; resumable.",
    )
    p.add_argument("inputs", nargs="*", help="files, directories or hub:NAME[:SPLIT]")
    p.add_argument("--output-prefix", "-o", help="writes PREFIX_{train,valid}_text_document.{bin,idx}, PREFIX_summary.json")
    p.add_argument("--tokenizer-model", help="existing SentencePiece .model (default: train one)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--tokenizer-train-mb", type=float, default=1024.0,
                   help="text read to train the tokenizer (MB)")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines SentencePiece samples from that text")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--valid-ratio", type=float, default=0.0005)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--text-field", default="text", help="JSON/parquet/dataset column holding the text")
    p.add_argument("--shard-mb", type=float, default=16.0, help="text per shard (the resume unit)")
    p.add_argument("--max-document-mb", type=float, default=16.0,
                   help="skip (and count) larger documents; encoding one takes ~55 bytes of memory per byte")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs for the prefix")
    p.add_argument("--keep-work", action="store_true", help="keep PREFIX_work/ shards after merging")
    p.add_argument("--total-docs", type=int, default=None, help="expected documents, for the ETA")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verify", metavar="PREFIX", help="check PREFIX.bin/.idx and print samples")
    p.add_argument("--samples", type=int, default=3, help="decoded samples printed by --verify")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mom_dist.data.preprocess import REJECTED, OutputExistsError, preprocess

    try:
        if args.verify:
            from mom_dist.data.indexed import verify

            report = verify(args.verify, args.tokenizer_model, samples=args.samples)
            print(json.dumps(report, indent=2, ensure_ascii=False))
            print(f"OK: {report['documents']:,} documents, {report['tokens']:,} tokens", file=sys.stderr)
            return 0
        if not args.inputs or not args.output_prefix:
            print("mom-preprocess: error: give INPUT... and --output-prefix (or --verify PREFIX)", file=sys.stderr)
            return BAD_INPUT
        summary = preprocess(
            args.inputs, args.output_prefix, tokenizer_model=args.tokenizer_model,
            vocab_size=args.vocab_size, model_type=args.model_type, workers=args.workers,
            valid_ratio=args.valid_ratio, seed=args.seed, overwrite=args.overwrite,
            text_field=args.text_field, shard_mb=args.shard_mb,
            tokenizer_train_mb=args.tokenizer_train_mb, input_sentence_size=args.input_sentence_size,
            max_document_mb=args.max_document_mb, keep_work=args.keep_work,
            progress=False if args.no_progress else (args.total_docs or True),
        )
    except REJECTED + (OutputExistsError, FileNotFoundError) as err:
        print(f"mom-preprocess: error: {_one_line(err)}", file=sys.stderr)
        return BAD_INPUT
    except OSError as err:  # disk full, permissions on the output side: the work dir is kept
        print(f"mom-preprocess: error: {_one_line(err)} (rerun the same command to resume)", file=sys.stderr)
        return FAILED
    if summary.get("already_complete"):
        print(f"mom-preprocess: {args.output_prefix} is already complete for these inputs and settings; "
              "nothing to do (--overwrite rebuilds it)", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("documents", "tokens", "train", "valid", "skipped",
                                              "wall_time_s")}, indent=2))
    if summary["skipped_total"]:
        first = summary["skipped_examples"][0] if summary["skipped_examples"] else None
        where = f"; first at {first['where']} ({first['reason']})" if first else ""
        large = (f"; documents above --max-document-mb {summary['max_document_mb']:g} are skipped"
                 if summary["skipped"].get("document_too_large") else "")
        print(f"mom-preprocess: skipped {summary['skipped_total']} records: {summary['skipped']}{where} "
              f"(up to 20 locations in {args.output_prefix}_summary.json){large}", file=sys.stderr)
    return FINISHED


def _one_line(err) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
