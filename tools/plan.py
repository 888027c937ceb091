"""Thin shim: ``python tools/plan.py CONFIG --cluster ...`` == ``mom-plan CONFIG --cluster ...``."""
import sys

from mom_dist.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
