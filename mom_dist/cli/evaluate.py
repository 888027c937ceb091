"""``mom-eval``: perplexity of a trained model on an indexed dataset.

    mom-eval SOURCE --data PREFIX [--seq-len 1024] [--stride S] [--batch-size 8] [--max-batches N]
                    [--tokenizer M.model] [--no-progress] [--compile auto|on|off]

SOURCE is a training run directory (any layout), a ``mom-convert export`` directory or a
``mom-convert to-hf`` directory; PREFIX an indexed dataset written by ``mom-preprocess``. Data
made with another tokenizer than the model's is refused (the check training uses): re-tokenize
it with the model's tokenizer. --tokenizer names the model's tokenizer when SOURCE does not
record one (another tokenizer than the one SOURCE records is refused). --stride S scores
lm-eval's rolling windows (every token once, S new tokens per window; S = --seq-len is
lm-eval's loglikelihood_rolling). --compile runs the model through torch.compile (auto: on with
CUDA; compiling takes about a minute there, so --compile off suits a quick look). A progress bar
goes to stderr, the result (JSON) to stdout. Bad input exits 2 with one line ``mom-eval: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mom_dist.exit_codes import BAD_INPUT, FINISHED


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("source")
    ap.add_argument("--data", required=True, help="indexed dataset prefix (PREFIX.bin/.idx)")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    ap.add_argument("--stride", type=int, default=None, help="rolling windows predicting S new tokens each "
                    "(lm-eval's definition; default: non-overlapping windows)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int, default=None)
    ap.add_argument("--tokenizer", default=None, help="the model's SentencePiece .model, when SOURCE records none")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile the model (auto: on with CUDA, off on CPU, where it does not pay)")
    args = ap.parse_args(argv)

    from mom_dist.checkpoint.sources import read_source
    from mom_dist.convert.model_tokenizer import choose_tokenizer
    from mom_dist.evaluate.perplexity import check_data_for_model, perplexity
    from mom_dist.model.compile import compile_model, compile_summary, compile_wanted

    try:
        if not os.path.exists(args.source):
            raise ValueError(f"'{args.source}' does not exist; pass a run, mom-convert export or to-hf directory")
        if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
            raise ValueError(f"--tokenizer {args.tokenizer}: no such file")
        if not (os.path.exists(args.data + ".bin") or os.path.exists(args.data + ".idx")):
            raise ValueError(f"--data {args.data}: no {args.data}.bin/.idx; pass the prefix mom-preprocess wrote "
                             "(e.g. data/owt_valid_text_document, without .bin)")
        device = args.device or ("cuda" if _cuda() else "cpu")
        if device.startswith("cuda") and not _cuda():
            raise ValueError(f"--device {device}: no CUDA device here; use --device cpu")
        model, search = read_source(args.source)
        tokenizer = choose_tokenizer(args.source, search, args.tokenizer)  # --tokenizer: only the model's own
        eod = check_data_for_model(args.data, model.cfg.vocab_size, tokenizer)
        compiled = compile_wanted(args.compile, device)
        if compiled:
            compile_model(model)
        res = perplexity(model, args.data, seq_len=args.seq_len or model.cfg.max_seq_len, stride=args.stride,
                         batch_size=args.batch_size, max_batches=args.max_batches, device=device, eod=eod,
                         progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"mom-eval: error: {err}", file=sys.stderr)
        return BAD_INPUT
    if compiled:
        print(f"mom-eval: {compile_summary()}", file=sys.stderr)
    print(json.dumps(res))
    return FINISHED


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
