"""Thin shim: ``python tools/prune.py SOURCE -o OUT --attn-keep 0.5 ...`` == ``mom-prune SOURCE -o OUT ...``."""
import os, sys  # noqa: E401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mom_dist.cli.prune import main  # noqa: E402
if __name__ == "__main__":
    sys.exit(main())
