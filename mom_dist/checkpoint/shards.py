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
(which returns its size and checksum, hashed from the bytes it wrote: ``integrity``) and opened by
``open_shard`` (which checks them when given the record, and turns a file safetensors cannot
read - truncated, a damaged header - into one ``DamagedCheckpoint`` line naming it).
"""

from __future__ import annotations

import bisect
import json
import os

import torch

from mom_dist.checkpoint.integrity import check_file, safetensors_record
from mom_dist.checkpoint.layout import DamagedCheckpoint, rank_file

FORMAT = "mom_dist.sharded.v1"


def write_shard(path: str, tensors: dict, metadata: dict) -> dict:
    """Write one shard file (the only place one is written); returns its record
    ``{"bytes", "xxh3_64"}`` for ``mom_state.json``."""
    from safetensors.torch import save_file

    # Own copies on the CPU (views of one flat partition share storage, which safetensors refuses;
    # a GPU tensor is copied once here instead of inside save_file), hashed from the same memory.
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    save_file(cpu, path, metadata=metadata)
    return safetensors_record(path, cpu)


def open_shard(path: str, record: dict | None = None):
    """Open one shard file for reading slices (the only place one is opened), after checking it
    against its ``record`` (size, checksum) when there is one. Returns (file, global shapes, step
    counts); a file that is not a readable shard of this format is a ``DamagedCheckpoint``."""
    from safetensors import safe_open

    check_file(path, record)
    try:
        f = safe_open(path, framework="pt")
        meta = f.metadata() or {}
    except Exception as e:  # safetensors' SafetensorError: truncated, or a header that does not parse
        raise DamagedCheckpoint(path, f"safetensors cannot read it: {_first_line(e)}") from None
    if meta.get("format") != FORMAT:
        raise DamagedCheckpoint(path, f"it is not a mom_dist checkpoint file (format {meta.get('format')!r})")
    try:
        shapes = {k: [int(s) for s in v] for k, v in json.loads(meta["shapes"]).items()}
        steps = {k: int(v) for k, v in json.loads(meta["steps"]).items()}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise DamagedCheckpoint(path, f"its header's metadata is unreadable ({type(e).__name__}: {e})") from None
    return f, shapes, steps


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def write_pieces(tag_dir: str, rank: int, world: int, pieces: list, shapes: dict, steps: dict) -> dict:
    """Write this rank's pieces [(kind, name, global start, 1-D tensor)]; returns the file's
    record (bytes, checksum)."""
    tensors = {f"{kind}:{name}:{start}": t.detach().reshape(-1) for kind, name, start, t in pieces}
    meta = {"format": FORMAT, "rank": str(rank), "world": str(world),
            "shapes": json.dumps({k: list(v) for k, v in shapes.items()}), "steps": json.dumps(steps)}
    return write_shard(rank_file(tag_dir, rank), tensors, meta)


class ShardedState:
    """Reader of a checkpoint's pieces, written by ``world`` ranks (stale files of a larger
    world left by an earlier, interrupted save of the same tag are ignored)."""

    def __init__(self, tag_dir: str, world: int, records: dict | None = None):
        """``records``: the ``files`` of ``mom_state.json``, to check every file against before
        reading it (None: already checked, or written before checksums)."""
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
            f, shapes, steps = open_shard(path, (records or {}).get(os.path.basename(path)))
            self._files.append(f)
            self.shapes.update(shapes)
            for name, step in steps.items():
                self.steps[name] = max(step, self.steps.get(name, 0))
            for key in f.keys():
                try:
                    kind, name, start = key.rsplit(":", 2)
                    start = int(start)
                except ValueError:
                    raise DamagedCheckpoint(path, f"it holds a tensor named {key!r}, not kind:name:offset") from None
                n = f.get_slice(key).get_shape()[0]
                self._index.setdefault((kind, name), []).append((start, start + n, len(self._files) - 1, key))
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
