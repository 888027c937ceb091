"""Shim for `mom-preprocess` when the package is not installed: python tools/preprocess.py ..."""
import os, sys  # noqa: E401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mom_dist.cli.preprocess import main  # noqa: E402
if __name__ == "__main__":  # guard: worker processes (spawn) re-import this file
    sys.exit(main())
