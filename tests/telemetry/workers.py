"""Worker functions for the telemetry tests, run one process per rank by ``tests.dist_utils``-style
launching (``mom_dist.parallel.local_launch.run_ranks``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mom_dist.parallel.local_launch import worker_main


class ForwardPayloadMeter:
    """Wraps ``dist.all_to_all_single`` (looked up at call time by ``mom_dist.parallel.all_to_all``)
    and adds up the floating-point bytes each call sends to *other* ranks outside autograd's
    backward, i.e. in forward passes (the tests run no evaluation; integer/bool buffers are
    split counts, pair metadata and capacity masks, not payload)."""

    def __init__(self):
        self.bytes = 0

    def __enter__(self):
        self._orig = orig = dist.all_to_all_single

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            if torch._C._current_graph_task_id() == -1 and input.is_floating_point():  # -1: not in backward
                n, me = dist.get_world_size(group), dist.get_rank(group)
                rows = input.shape[0]
                splits = input_split_sizes or [rows // n] * n
                row_bytes = (input[0].numel() if rows else 0) * input.element_size()
                self.bytes += (rows - splits[me]) * row_bytes
            return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig


def train_metered(args: dict) -> dict:
    """Train each run in turn; return this rank's metered forward all-to-all payload per run."""
    from mom_dist.config import load_config
    from mom_dist.train.trainer import train

    out = {}
    for run in args["runs"]:
        cfg = load_config(args["config"], args["base"] + run["overrides"])
        with ForwardPayloadMeter() as meter:
            res = train(cfg, log=lambda *a: None)
        out[run["name"]] = {"wire_bytes": meter.bytes, "losses": res.losses, "rank": dist.get_rank()}
        del res
    return out


if __name__ == "__main__":
    worker_main(globals())
