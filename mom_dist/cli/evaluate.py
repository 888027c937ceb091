"""``mom-eval``: validation perplexity of a trained model on an indexed dataset.

    mom-eval SOURCE --data PREFIX [--seq-len 1024] [--batch-size 8] [--max-batches N]

SOURCE is a training run directory (any layout) or a ``mom-convert export`` directory; PREFIX
an indexed dataset written by ``mom-preprocess`` with the model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("--data", required=True, help="indexed dataset prefix (PREFIX.bin/.idx)")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int, default=None)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = ap.parse_args(argv)

    from mom_dist.convert.export import load_exported
    from mom_dist.train.evaluation import perplexity

    try:
        model = load_exported(args.source)
        res = perplexity(model, args.data, seq_len=args.seq_len or model.cfg.max_seq_len,
                         batch_size=args.batch_size, max_batches=args.max_batches, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"mom-eval: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
