"""megatron-core GPTDatasets for a `DataConfig`: one per prefix, blended, on every rank.

With a process group, global rank 0 builds the index caches first, all ranks meet at a
barrier, then the others load them; every rank first checks that it sees a file rank 0 wrote
in the cache folder, and fails clearly if not (a node-local folder on several nodes). With
`cache_shared=False` the local rank 0 of every other node builds its node's copy first, in a
child process without a process group. Without a process group everything is built
in-process. Cache files are read without pickle (`index_cache.CheckedGPTDataset`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import uuid
from typing import Optional

from mom_dist.data import indexed
from mom_dist.data.data_checks import _TokenizerInfo, check_data
from mom_dist.data.data_config import DataConfig


def _gpt_config(cfg: DataConfig, tok: _TokenizerInfo, prefix: str, split: str, cache: Optional[str]):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length, blend=([prefix], None), split=split,
        path_to_cache=cache, tokenizer=tok, reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask, eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.reset_attention_mask, mid_level_dataset_surplus=0.005,
    )


def _weights(prefixes, weights):
    if weights is None:  # proportional to tokens, as if the prefixes were one corpus
        weights = [float(indexed.read_index(p).tokens) for p in prefixes]
    total = float(sum(weights))
    return [w / total for w in weights]


def _build_splits(cfg: DataConfig, tok: _TokenizerInfo, train_samples: int, valid_samples: int):
    """Build (train, valid) datasets; megatron handles rank-0-first when a group exists."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from mom_dist.data.index_cache import CheckedGPTDataset

    cache = cfg.resolved_cache_dir()
    surplus = 0.005  # megatron's mid-level surplus, so a blend never runs a member dry

    def build(prefixes, weights, split, targets):
        """One blend: per-prefix GPTDatasets for every split, then blended per split."""
        ws = _weights(prefixes, weights)
        per_split = [[], [], []]
        for p, w in zip(prefixes, ws):
            sizes = [t if len(prefixes) == 1 else int(math.ceil(math.ceil(t * w) * (1 + surplus)))
                     for t in targets]
            builder = BlendedMegatronDatasetBuilder(
                CheckedGPTDataset, [max(n, 1) for n in sizes], lambda: True, _gpt_config(cfg, tok, p, split, cache))
            for i, ds in enumerate(builder.build()):
                per_split[i].append(ds)
        out = []
        for i, parts in enumerate(per_split):
            if not parts or parts[0] is None or targets[i] == 0:
                out.append(None)
            elif len(parts) == 1:
                out.append(parts[0])
            else:
                # megatron's BlendedDataset, in memory (no cache): its cache path calls
                # get_rank() even without a process group, the blend index is cheap, and
                # megatron would load a blend cache with allow_pickle=True (index_cache.py).
                out.append(BlendedDataset(parts, ws, targets[i], _gpt_config(cfg, tok, prefixes[0], split, None)))
        return out

    if cfg.valid_prefixes:
        train = build(cfg.train_prefixes, cfg.train_weights, "1,0,0", [train_samples, 0, 0])[0]
        valid = build(cfg.valid_prefixes, cfg.valid_weights, "0,1,0", [0, valid_samples, 0])[1] \
            if valid_samples > 0 else None
    else:
        train, valid, _ = build(cfg.train_prefixes, cfg.train_weights, cfg.resolved_split(),
                                [train_samples, valid_samples, 0])
    return train, valid


def _build_in_child(cfg_dict: dict, vocab_size: int, train_samples: int, valid_samples: int) -> None:
    """Entry of the child process that fills a node-local cache (no process group here)."""
    cfg = DataConfig(**cfg_dict)
    _build_splits(cfg, check_data(cfg, vocab_size), train_samples, valid_samples)


def _check_cache_visible(cache: str) -> None:
    """Every rank must see a file global rank 0 wrote in cache_dir, or the caches cannot be shared."""
    import torch
    import torch.distributed as dist

    os.makedirs(cache, exist_ok=True)
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(cache, f".probe-{token[0]}")
    if dist.get_rank() == 0:
        with open(probe, "w") as f:
            f.write("ok")
    dist.barrier()
    missing = torch.tensor([0 if os.path.exists(probe) else 1])
    dist.all_reduce(missing)
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(probe)
    if int(missing.item()):
        raise RuntimeError(
            f"{int(missing.item())} rank(s) cannot see files global rank 0 writes in cache_dir={cache!r}: "
            "it is not shared between nodes. Put it on a shared filesystem, or set "
            "DataConfig.cache_shared=False to build one copy per node"
        )


def build_datasets(cfg: DataConfig, *, vocab_size: int, train_samples: int, valid_samples: int):
    """Check the data, then build (train, valid) datasets on every rank (see module doc)."""
    import torch.distributed as dist

    tok = check_data(cfg, vocab_size)
    cache = cfg.resolved_cache_dir()
    if dist.is_available() and dist.is_initialized():
        if cfg.cache_shared:
            _check_cache_visible(cache)
        else:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank == 0 and dist.get_rank() != 0:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")
                child = ctx.Process(target=_build_in_child,
                                    args=(dataclasses.asdict(cfg), vocab_size, train_samples, valid_samples))
                child.start()
                child.join()
                if child.exitcode != 0:
                    raise RuntimeError(f"building the node-local index cache in {cache} failed "
                                       f"(exit code {child.exitcode}); see the child's traceback above")
            dist.barrier()
    return _build_splits(cfg, tok, train_samples, valid_samples)
