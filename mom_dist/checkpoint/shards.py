"""The layout-free checkpoint format: pieces of global tensors, one safetensors file per rank.

A checkpoint's training state is a set of *global* tensors, each named by kind and by the
parameter's single-process name (``param:chunks.0.ffn_pool.fc_weight`` is the fp32 master of
all N modules of that pool, ``exp_avg:...`` and ``exp_avg_sq:...`` Adam's moments). Every
global tensor is addressed flat (row-major), so any slice a rank owns in any layout - an EP
rank's modules, a ZeRO partition fragment, a replica's share - is one range [start, start+n):

    <tag>/state_rank00003.safetensors
        tensors  "exp_avg:chunks.0.ffn_pool.fc_weight:12288" -> 1-D, the range starting at 12288
        metadata {"format": FORMAT, "rank": "3", "world": "4",
                  "shapes": {name: global shape}, "steps": {name: optimizer step count}}

Ranks write the pieces they own; readers find the pieces overlapping the range they need in
their own layout (``ShardedState.read``), reading only those bytes. safetensors holds no code,
so loading a checkpoint never unpickles anything. Every shard file is written by ``write_shard``
and opened by ``open_shard``: checks of a whole file (checksums) belong there.
"""

from __future__ import annotations

import bisect
import json
import os

import torch

from mom_dist.checkpoint.layout import rank_file

FORMAT = "mom_dist.sharded.v1"


def write_shard(path: str, tensors: dict, metadata: dict) -> None:
    """Write one shard file (the only place one is written)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def open_shard(path: str):
    """Open one shard file for reading slices (the only place one is opened); its metadata
    must say it is a shard of this format."""
    from safetensors import safe_open

    f = safe_open(path, framework="pt")
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a mom_dist checkpoint file (format {meta.get('format')!r})")
    return f


def write_pieces(tag_dir: str, rank: int, world: int, pieces: list, shapes: dict, steps: dict) -> int:
    """Write this rank's pieces [(kind, name, global start, 1-D tensor)]; returns bytes written."""
    tensors = {f"{kind}:{name}:{start}": t.detach().reshape(-1).clone() for kind, name, start, t in pieces}
    meta = {"format": FORMAT, "rank": str(rank), "world": str(world),
            "shapes": json.dumps({k: list(v) for k, v in shapes.items()}), "steps": json.dumps(steps)}
    path = rank_file(tag_dir, rank)
    write_shard(path, tensors, meta)
    return os.path.getsize(path)


class ShardedState:
    """Reader of a checkpoint's pieces, written by ``world`` ranks (stale files of a larger
    world left by an earlier, interrupted save of the same tag are ignored)."""

    def __init__(self, tag_dir: str, world: int):
        self.tag_dir = tag_dir
        self.shapes: dict[str, list] = {}
        self.steps: dict[str, int] = {}
        self._files = []
        self._index: dict[tuple, list] = {}  # (kind, name) -> sorted [(start, end, file, key)]
        for rank in range(world):
            path = rank_file(tag_dir, rank)
            if not os.path.exists(path):
                raise ValueError(f"checkpoint '{tag_dir}' lacks {os.path.basename(path)} (written by {world} "
                                 "ranks); it is incomplete: point 'latest' at a complete checkpoint")
            f = open_shard(path)
            meta = f.metadata()
            self._files.append(f)
            self.shapes.update({k: list(v) for k, v in json.loads(meta["shapes"]).items()})
            for name, step in json.loads(meta["steps"]).items():
                self.steps[name] = max(step, self.steps.get(name, 0))
            for key in f.keys():
                kind, name, start = key.rsplit(":", 2)
                n = f.get_slice(key).get_shape()[0]
                self._index.setdefault((kind, name), []).append((int(start), int(start) + n, len(self._files) - 1, key))
        self._kinds: dict[str, set] = {}
        for (kind, name), pieces in self._index.items():
            pieces.sort()
            self._kinds.setdefault(name, set()).add(kind)

    def kinds(self, name: str) -> set:
        """The kinds of state saved for parameter ``name``."""
        return self._kinds.get(name, set())

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n

    def read(self, kind: str, name: str, start: int, numel: int) -> torch.Tensor:
        """The flat range [start, start+numel) of global tensor ``kind:name``, as fp32."""
        pieces = self._index.get((kind, name))
        if pieces is None:
            raise ValueError(f"checkpoint '{self.tag_dir}' holds no '{kind}' state for parameter '{name}'")
        out = torch.empty(numel, dtype=torch.float32)
        end, pos = start + numel, start
        i = max(0, bisect.bisect_right(pieces, (start, float("inf"))) - 1)
        while pos < end and i < len(pieces):
            p_start, p_end, fi, key = pieces[i]
            if p_end > pos and p_start <= pos:
                hi = min(p_end, end)
                out[pos - start:hi - start] = self._files[fi].get_slice(key)[pos - p_start:hi - p_start].float()
                pos = hi
            i += 1
        if pos < end:
            raise ValueError(f"checkpoint '{self.tag_dir}' does not cover {kind} of '{name}' at [{pos}, {end}); "
                             "it is incomplete")
        return out

    def full(self, kind: str, name: str) -> torch.Tensor:
        """The whole global tensor, shaped."""
        return self.read(kind, name, 0, self.numel(name)).view(self.shapes[name])
