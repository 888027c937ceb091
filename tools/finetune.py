"""Shim for `mom-finetune` (e.g. under the deepspeed launcher): deepspeed --num_gpus 8 tools/finetune.py ..."""
import os, sys  # noqa: E401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mom_dist.cli.finetune import main  # noqa: E402
if __name__ == "__main__":
    sys.exit(main())
