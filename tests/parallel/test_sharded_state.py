"""The layout-free checkpoint format on its own: pieces written by some ranks are read back as
any range of the global tensors; gaps, missing rank files and foreign files are errors."""

import pytest
import torch

from mom_dist.checkpoint.layout import rank_file
from mom_dist.checkpoint.shards import ShardedState, write_pieces


def write(tmp_path, world, cuts, full, extra_rank=None):
    """Rank r writes the flat range [cuts[r], cuts[r+1]) of ``full`` (params and exp_avg = 2x)."""
    flat = full.reshape(-1)
    for r in range(world):
        lo, hi = cuts[r], cuts[r + 1]
        write_pieces(str(tmp_path), r, world, [("param", "w", lo, flat[lo:hi]), ("exp_avg", "w", lo, 2 * flat[lo:hi])],
                     {"w": full.shape}, {"w": 7})


def test_any_range_reads_back_across_piece_boundaries(tmp_path):
    full = torch.randn(4, 3, 5)
    write(tmp_path, 3, [0, 17, 18, 60], full)
    reader = ShardedState(str(tmp_path), 3)
    assert reader.shapes == {"w": [4, 3, 5]} and reader.steps == {"w": 7} and reader.kinds("w") == {"param", "exp_avg"}
    assert torch.equal(reader.full("param", "w"), full)
    for start, n in ((0, 60), (15, 5), (17, 1), (18, 42), (59, 1), (3, 0)):
        assert torch.equal(reader.read("param", "w", start, n), full.reshape(-1)[start:start + n])
        assert torch.equal(reader.read("exp_avg", "w", start, n), 2 * full.reshape(-1)[start:start + n])
    with pytest.raises(ValueError, match="holds no 'exp_avg_sq' state"):
        reader.read("exp_avg_sq", "w", 0, 1)


def test_gaps_missing_ranks_and_foreign_files_are_refused(tmp_path):
    full = torch.randn(10)
    write(tmp_path, 2, [0, 4, 10], full)
    with pytest.raises(ValueError, match="lacks state_rank00002.safetensors"):
        ShardedState(str(tmp_path), 3)
    write_pieces(str(tmp_path), 1, 2, [("param", "w", 5, full[5:])], {"w": [10]}, {"w": 1})  # rank 1 lost [4, 5)
    with pytest.raises(ValueError, match=r"does not cover param of 'w' at \[4, 10\)"):
        ShardedState(str(tmp_path), 2).read("param", "w", 0, 10)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, rank_file(str(tmp_path), 0))
    with pytest.raises(ValueError, match="is not a mom_dist checkpoint file"):
        ShardedState(str(tmp_path), 2)


def test_files_of_a_larger_world_left_by_an_interrupted_save_are_ignored(tmp_path):
    full = torch.randn(8)
    write(tmp_path, 4, [0, 2, 4, 6, 8], torch.zeros(8))  # an interrupted save by 4 ranks
    write(tmp_path, 2, [0, 3, 8], full)  # the complete one, by 2 ranks
    assert torch.equal(ShardedState(str(tmp_path), 2).full("param", "w"), full)
