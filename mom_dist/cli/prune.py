"""``mom-prune``: remove the least-used modules of a trained MoM and write the smaller model.

    mom-prune SOURCE -o OUT --attn-keep 0.5 --ffn-keep 0.75 [--data PREFIX] [--by usage|score]
              [--seq-len N] [--batch-size 8] [--max-batches 16] [--tokenizer M.model]
              [--to-hf HF_DIR [--no-tokenizer]] [--overwrite] [--device cpu|cuda]

SOURCE is a run directory (any layout), a ``mom-convert export`` directory or a to-hf directory.
Every chunk keeps floor(keep x N) modules of each pool: the most used on PREFIX (an indexed
dataset; default: the run's validation data), where usage is a module's share of its router's
picks summed over the routing steps, counted by the routing telemetry's counters (``--by score``:
the mean router probability instead). The per-module table is printed and written to
OUT/prune_table.json with the loss before and after on the same tokens. OUT is an exported
directory (what mom-eval, mom-finetune, mom-convert to-hf and train.init_from read); --to-hf also
writes a transformers directory. Bad input exits 2 with one line ``mom-prune: error: ...``, before
anything is written; existing outputs are never overwritten without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mom_dist.exit_codes import BAD_INPUT, FINISHED

TABLE_FILE = "prune_table.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-prune", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("source")
    ap.add_argument("-o", "--output", required=True, help="the pruned model, as an exported directory")
    ap.add_argument("--attn-keep", type=float, default=1.0, help="fraction of each chunk's attention modules kept")
    ap.add_argument("--ffn-keep", type=float, default=1.0, help="fraction of each chunk's FFN modules kept")
    ap.add_argument("--data", default=None, help="indexed dataset prefix the usage is measured on "
                    "(default: the run's validation data)")
    ap.add_argument("--by", choices=("usage", "score"), default="usage")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int, default=16, help="batches measured (0: the whole dataset)")
    ap.add_argument("--tokenizer", default=None, help="the model's SentencePiece .model, when SOURCE records none")
    ap.add_argument("--to-hf", default=None, metavar="HF_DIR", help="also write a transformers directory")
    ap.add_argument("--no-tokenizer", action="store_true", help="--to-hf without a tokenizer (synthetic data)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        return _prune(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mom-prune: error: {err}", file=sys.stderr)
        return BAD_INPUT


def _prune(args) -> int:
    import torch

    from mom_dist.checkpoint.exported import save_exported
    from mom_dist.checkpoint.sources import load_source
    from mom_dist.convert.hf import export_hf, refuse_existing
    from mom_dist.evaluate import prune as P
    from mom_dist.evaluate.perplexity import check_data_for_model
    from mom_dist.model import MoMModel

    if not os.path.exists(args.source):
        raise ValueError(f"'{args.source}' does not exist; pass a run, mom-convert export or to-hf directory")
    for name in ("attn", "ffn"):
        P.check_fraction(getattr(args, f"{name}_keep"), name)  # before anything is read
    outputs = [args.output] + ([args.to_hf] if args.to_hf else [])
    if args.to_hf and os.path.realpath(args.to_hf) == os.path.realpath(args.output):
        raise ValueError("--to-hf and -o name the same directory; give each its own")
    for out in outputs:
        if os.path.realpath(out) == os.path.realpath(args.source):
            raise ValueError(f"output '{out}' is SOURCE itself; write the pruned model elsewhere")
        refuse_existing(out, args.overwrite)
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer}: no such file")
    if args.batch_size < 1 or args.max_batches < 0:
        raise ValueError("--batch-size must be >= 1 and --max-batches >= 0")
    data = args.data or _run_valid_prefix(args.source)
    if not (os.path.exists(data + ".bin") or os.path.exists(data + ".idx")):
        raise ValueError(f"--data {data}: no {data}.bin/.idx; pass the prefix mom-preprocess wrote "
                         "(e.g. data/owt_valid_text_document, without .bin)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here; use --device cpu")

    model, tokenizer = _load(load_source, args.source)
    P.check_prunable(model.cfg)
    counts = {p: P.keep_count(getattr(args, f"{p}_keep"), getattr(model.cfg, P.POOL_FIELD[p]), p) for p in P.POOLS}
    tokenizer = args.tokenizer or tokenizer
    eod = check_data_for_model(data, model.cfg.vocab_size, tokenizer)
    if args.to_hf and tokenizer is None and not args.no_tokenizer:
        raise ValueError(f"no tokenizer is recorded for '{args.source}'; pass --tokenizer M.model (for --to-hf), "
                         "or --no-tokenizer for a model trained on synthetic data")
    seq_len = args.seq_len or model.cfg.max_seq_len
    window = dict(seq_len=seq_len, batch_size=args.batch_size, max_batches=args.max_batches or None, eod=eod,
                  device=device, progress=not args.no_progress)
    before = P.measure(model, data, **window)
    kept = P.choose(before.pools, counts, args.by)
    cfg, state_dict, notes = P.prune_state(model.cfg, model.to("cpu").state_dict(), kept, before.pools)
    pruned = MoMModel(cfg)
    pruned.load_state_dict(state_dict)  # strict: the rewritten weights fit the rewritten config
    after = P.measure(pruned.eval(), data, **window)
    pruned.cpu()  # written from host memory, whatever device measured it

    rows = P.table_rows(before.pools, kept)
    print(f"mom-prune: routing of {args.source} on {data} ({before.tokens:,} tokens, windows of {seq_len})")
    print(P.format_table(rows, args.by))
    report = {
        "source": os.path.abspath(args.source), "data": os.path.abspath(data), "by": args.by,
        "attn_keep": args.attn_keep, "ffn_keep": args.ffn_keep, "tokens": before.tokens, "seq_len": seq_len,
        "kept": {f"{c}.{p}": ids for (c, p), ids in sorted(kept.items())},
        "n_attn_modules": [model.cfg.n_attn_modules, cfg.n_attn_modules],
        "n_ffn_modules": [model.cfg.n_ffn_modules, cfg.n_ffn_modules],
        "parameters": [model.num_parameters(), pruned.num_parameters()],
        "loss_before": before.loss, "loss_after": after.loss,
        "perplexity_before": before.perplexity, "perplexity_after": after.perplexity,
        "notes": notes, "recovery_overrides": P.recovery_overrides(model.cfg, cfg), "rows": rows,
    }
    out = save_exported(args.output, cfg, pruned.state_dict(), overwrite=args.overwrite, tokenizer=tokenizer)
    with open(os.path.join(out, TABLE_FILE), "w") as f:
        json.dump(report, f, indent=1)
    if args.to_hf:
        export_hf(pruned, args.to_hf, overwrite=args.overwrite, tokenizer=None if args.no_tokenizer else tokenizer)
    for note in notes:
        print(f"mom-prune: note: {note}")
    print(f"mom-prune: attention modules {model.cfg.n_attn_modules} -> {cfg.n_attn_modules}, FFN modules "
          f"{model.cfg.n_ffn_modules} -> {cfg.n_ffn_modules} per chunk; parameters {report['parameters'][0]:,} -> "
          f"{report['parameters'][1]:,}; loss {before.loss:.4f} -> {after.loss:.4f} (perplexity "
          f"{before.perplexity:.2f} -> {after.perplexity:.2f}) on the same tokens")
    sets = " ".join(f"--set {s}" for s in report["recovery_overrides"])
    print(f"mom-prune: wrote {out} ({TABLE_FILE} beside the weights)" + (f" and {args.to_hf}" if args.to_hf else ""))
    print(f"mom-prune: recovery training: mom-train --config CFG --set train.init_from={os.path.abspath(out)} {sets}".rstrip())
    return FINISHED


def _load(load_source, source: str):
    """(model, tokenizer) of SOURCE; an unreadable or corrupt one is bad input, not a traceback."""
    try:
        return load_source(source)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # safetensors' SafetensorError, torch's RuntimeError (shapes), OSError, KeyError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read a model from '{source}' ({type(err).__name__}: {first}); it is corrupt or "
                         "not a run, mom-convert export or to-hf directory") from None


def _run_valid_prefix(source: str) -> str:
    """The validation data a training run recorded with its checkpoint (else its training data),
    a relative path resolved against the directory the run was started in (its ``workdir``)."""
    from mom_dist.checkpoint.exported import is_exported
    from mom_dist.checkpoint.layout import find_tag_dir, read_state
    from mom_dist.convert.hf import is_hf_dir
    from mom_dist.convert.model_tokenizer import run_path

    config = {}
    if not (is_exported(source) or is_hf_dir(source)):
        config = read_state(find_tag_dir(source)).get("config") or {}  # a damaged record: one line, as everywhere
    data = config.get("data") if isinstance(config, dict) else None
    for key in ("valid_prefixes", "train_prefixes"):
        value = data.get(key) if isinstance(data, dict) else None
        prefixes = [value] if isinstance(value, str) else list(value or [])
        if prefixes:
            return run_path(str(prefixes[0]), config.get("workdir"))
    raise ValueError(f"'{source}' records no data to measure routing on (only a run directory does); pass --data "
                     "PREFIX (an indexed dataset made with the model's tokenizer)")


if __name__ == "__main__":
    sys.exit(main())
