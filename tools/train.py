"""Thin shim: ``python tools/train.py --config ...`` == ``mom-train --config ...``."""
import sys

from mom_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
