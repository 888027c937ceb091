"""``mom-convert``: checkpoints to evaluation formats.

    mom-convert export RUN_DIR -o OUT_DIR [--tag step00001000]   any layout -> one plain model
    mom-convert to-hf SOURCE -o HF_DIR                           -> transformers directory
      (export and to-hf: [--tokenizer M.model | --no-tokenizer])
    mom-convert from-hf HF_DIR --config CFG.yaml -o OUT_DIR      phase-2 init of a MoM from GPT-2
    mom-convert from-release SRC -o OUT_DIR                      the authors' release -> our format

SOURCE is a run directory, an exported directory or a to-hf directory. to-hf writes the vanilla
GPT-2 case as a stock GPT2LMHeadModel, and a routed MoM as MoMForCausalLM with its code in the
directory (load with trust_remote_code=True; needs only torch + transformers), both with the
tokenizer: the one the run's data was made with (found from its config / data, relative paths
from the directory the run was started in), else --tokenizer (refused when it is another
tokenizer than the one SOURCE records); export and to-hf stop naming the paths tried when the
recorded one is gone; --no-tokenizer writes none (models trained on synthetic data). A
fine-tuned classifier (mom-finetune OUT/model) goes to to-hf with its head
(MoMForSequenceClassification / GPT2ForSequenceClassification). Existing outputs are
never overwritten without --overwrite. from-release reads a GPT2MoTLMHeadModel save_pretrained
directory (config.json + model.safetensors or pytorch_model.bin) and writes an exported directory
(what mom-eval, mom-finetune and train.init_from read) with the release's loss settings.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mom-convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="consolidate a training checkpoint into one plain model directory")
    e.add_argument("run_dir")
    e.add_argument("--tag", default=None)
    h = sub.add_parser("to-hf", help="write a transformers directory (GPT-2 for the vanilla case)")
    h.add_argument("source")
    f = sub.add_parser("from-hf", help="decompose a GPT-2 directory into a MoM (spec §8 phase 2)")
    f.add_argument("hf_dir")
    f.add_argument("--config", required=True)
    f.add_argument("--set", dest="overrides", action="append", default=[])
    r = sub.add_parser("from-release", help="import a checkpoint of the authors' release (GPT2MoTLMHeadModel)")
    r.add_argument("src")
    r.add_argument("output_positional", nargs="?", metavar="OUT_DIR", help="the same as -o (older spelling)")
    for p in (e, h, f, r):
        p.add_argument("-o", "--output", required=p is not r)
        p.add_argument("--overwrite", action="store_true")
    for p in (e, h):
        p.add_argument("--tokenizer", default=None, help="SentencePiece .model to write with the model, when "
                       "SOURCE records none (else it must be the same tokenizer)")
        p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer (synthetic-data models)")
    args = ap.parse_args(argv)

    from mom_dist.checkpoint.exported import export_run, save_exported
    from mom_dist.convert.hf import refuse_existing

    try:
        if args.cmd == "from-release":
            from mom_dist.convert.release import load_release
            output = _release_output(args)
            refuse_existing(output, args.overwrite)  # before reading gigabytes
            cfg, sd = load_release(args.src)
            out = save_exported(output, cfg, sd, overwrite=args.overwrite)
        elif args.cmd == "export":
            out = export_run(args.run_dir, args.output, tag=args.tag, overwrite=args.overwrite,
                             tokenizer=_tokenizer_arg(args.tokenizer), no_tokenizer=args.no_tokenizer)
        elif args.cmd == "to-hf":
            from mom_dist.checkpoint.sources import read_source
            from mom_dist.convert.hf import export_hf
            from mom_dist.convert.model_tokenizer import choose_tokenizer
            from mom_dist.convert.task_head import load_task_head

            model, search = read_source(args.source)
            tok = None if args.no_tokenizer else choose_tokenizer(args.source, search, _tokenizer_arg(args.tokenizer))
            if tok is None and not args.no_tokenizer:
                raise ValueError(f"{search.missing(args.source)}; pass --tokenizer M.model (the SentencePiece model "
                                 "its data was made with), or --no-tokenizer for a model trained on synthetic data")
            out = export_hf(model, args.output, overwrite=args.overwrite, tokenizer=tok,
                            head=load_task_head(args.source))  # mom-finetune's classifier head
        else:
            import torch

            from mom_dist.config import load_config
            from mom_dist.convert.gpt2 import init_mom_from_gpt2
            from mom_dist.model import MoMModel

            cfg = load_config(args.config, args.overrides)
            torch.manual_seed(cfg.train.seed)
            model = MoMModel(cfg.model)
            init_mom_from_gpt2(model, args.hf_dir)
            out = save_exported(args.output, cfg.model, model.state_dict(), overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"mom-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"mom-convert: wrote {out}")
    return 0


def _release_output(args) -> str:
    """-o OUT_DIR, as for every other subcommand; the positional OUT_DIR of earlier versions still works."""
    given = [p for p in (args.output, args.output_positional) if p is not None]
    if not given:
        raise ValueError("from-release needs an output directory: mom-convert from-release SRC -o OUT_DIR")
    if len(given) == 2 and os.path.abspath(given[0]) != os.path.abspath(given[1]):
        raise ValueError(f"two different output directories given ('{given[1]}' and -o '{given[0]}'); "
                         "pass only -o OUT_DIR")
    return given[0]


def _tokenizer_arg(path):
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"--tokenizer {path}: no such file; pass the SentencePiece .model its data was made with")
    return path


if __name__ == "__main__":
    sys.exit(main())
