"""The trainer's checkpoint policy: when checkpoints go, which stay, and what a resume accepts.

The format and its mechanics live in ``mom_dist.checkpoint`` (files: ``layout``; writing and
restoring the engine in any layout: ``engine_io``). ``Checkpointer`` decides around them:

- ``save`` writes a checkpoint (``latest`` moves only once every rank has written its files,
  so a crash during a save leaves the previous checkpoint in force), then deletes older
  complete checkpoints beyond ``keep_last``; ``save_checked`` reports a full disk as such,
  naming the path, with the previous ``latest`` untouched and the partial checkpoint removed.
- the trainer saves only finite states, and ``_prune`` never deletes the newest checkpoint
  whose ``mom_state.json`` says ``finite``; ``rollback_before`` points ``latest`` back at it
  when a run diverges (``divergence``). Nor does it delete the checkpoint this launch resumed
  from: the last one known to verify (its files matched their checksums when it was loaded).
- ``load`` refuses a checkpoint of another model architecture before anything is loaded, then
  verifies its files against their checksums and resumes on any layout (a checkpoint of
  DeepSpeed's own format, written by earlier versions, on its own layout only). A SIGTERM/SIGUSR1 (``lifecycle``) asks for a save at the next step
  boundary. See docs/usage.md, "Checkpoint safety".
"""

from __future__ import annotations

import errno
import os
import shutil

from mom_dist.checkpoint import engine_io
from mom_dist.checkpoint.layout import (checkpoints_dir, is_finite, read_latest, read_state, step_of, tag_of,
                                        tags, write_latest)
from mom_dist.exit_codes import DiskFull


class Checkpointer:
    def __init__(self, out_dir: str, engine, dims, keep_last: int):
        self.dir = checkpoints_dir(out_dir)
        self.engine, self.dims, self.keep_last = engine, dims, keep_last
        self.verified: str | None = None  # the checkpoint this launch resumed from (verified on load)
        if dims.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
        engine_io.barrier()

    def latest_tag(self) -> str | None:
        return read_latest(self.dir)

    def save(self, step: int, consumed_samples: int, config: dict, loss: float | None = None,
             extra: dict | None = None) -> str:
        """``extra``: more of the trainer's state for ``mom_state.json`` (read back on resume)."""
        tag = tag_of(step)
        record = {"step": step, "consumed_samples": consumed_samples, "config": config, **(extra or {})}
        engine_io.save_engine(self.dir, tag, self.engine, self.dims, record, loss)
        if self.dims.rank == 0:
            self._prune(keep=tag)
        engine_io.barrier()
        return tag

    # ------------------------------------------------------------ safety (issue 7, part 2)
    def save_checked(self, step: int, consumed_samples: int, config: dict, loss: float,
                     extra: dict | None = None) -> str:
        """``save``, with a full disk reported as such (torch.save says only "unexpected pos")."""
        path = os.path.join(self.dir, tag_of(step))
        previous = self.latest_tag()
        try:
            return self.save(step, consumed_samples, config, loss=loss, extra=extra)
        except Exception as e:  # OSError; torch's RuntimeError; safetensors' SafetensorError
            if not _disk_full(e, self.dir):
                raise
            if self.dims.rank == 0 and previous != os.path.basename(path):
                shutil.rmtree(path, ignore_errors=True)  # the partial checkpoint: give the space back
            raise DiskFull(f"No space left on device while writing checkpoint '{path}'; 'latest' still names "
                           f"{previous or 'no checkpoint'}: free space (or lower train.keep_last) and relaunch to "
                           "resume") from None

    def _prune(self, keep: str) -> None:
        """Delete all but the ``keep_last`` newest checkpoints up to ``keep``, never ``keep`` and
        never the newest finite one before it: ``keep`` holds the weights *after* its step's
        update, which only the next step's loss confirms, so the checkpoint before it stays until
        then (with keep_last=1 two exist between saves). A checkpoint without the ``finite``
        record (older runs) counts as finite. The checkpoint this launch resumed from stays too:
        it is the last one whose files verified (the ones written since are checked when read)."""
        upto = [t for t in tags(self.dir) if t <= keep]
        finite = [t for t in upto if t < keep and is_finite(os.path.join(self.dir, t))]
        protected = {keep} | ({finite[-1]} if finite else set()) | ({self.verified} if self.verified else set())
        for old in upto[:-self.keep_last]:
            if old not in protected:
                shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)

    def load(self, model_cfg, tag: str | None = None) -> dict | None:
        """Restore engine, schedule, RNG; return the saved mom_state (None if nothing to resume).
        A checkpoint of another model architecture is refused before anything is loaded (a run
        would otherwise go on to prune it)."""
        tag = tag or self.latest_tag()
        if tag is None:
            return None
        path = os.path.join(self.dir, tag)
        state = read_state(path)
        from mom_dist.checkpoint.consolidate import same_architecture
        from mom_dist.config_utils import from_dict
        from mom_dist.model.config import ModelConfig

        if not same_architecture(from_dict(ModelConfig, state["config"]["model"], "model."), model_cfg):
            raise ValueError(f"'{self.dir}' holds checkpoints of a different model architecture; use a new "
                             "train.out_dir (to start from those weights, set train.init_from to that run)")
        state["resharded"] = engine_io.load_engine(path, self.engine, self.dims, state)
        state["verified"] = bool(state.get("files"))  # False: written before checksums existed
        self.verified = tag
        return state

    def rollback_before(self, first_bad_step: int) -> tuple[str | None, bool]:
        """A run diverged from ``first_bad_step`` on: a ``latest`` saved at the step just before
        holds the update that produced the first non-finite step, so point ``latest`` back at
        the newest finite checkpoint before it (kept by ``_prune``). Returns (``latest`` after,
        whether it is still that suspect checkpoint because no older one exists)."""
        tag = self.latest_tag()
        suspect = tag is not None and step_of(tag) >= first_bad_step - 1
        if suspect:
            older = [t for t in tags(self.dir) if t < tag and is_finite(os.path.join(self.dir, t))]
            if older:
                if self.dims.rank == 0:
                    write_latest(self.dir, older[-1])
                tag, suspect = older[-1], False
        engine_io.barrier()
        return tag, suspect


def _disk_full(err: Exception, path: str) -> bool:
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        return True
    try:  # torch.save's zip writer reports a short write as "unexpected pos ..."
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False
