"""Keep third-party import and start-up noise out of our commands' output.

Installed once by ``mom_dist/__init__.py``, so every CLI, launcher worker and library user gets
it. Each silenced message is named here with the reason it carries no information for a
mom_dist user; everything else (real warnings included) still shows. ``MOM_DIST_VERBOSE=1``
turns the filters off.

- megatron-core warns on import, once per module, that Transformer Engine and Apex are not
  installed: we use only megatron's dataset code, which needs neither.
- DeepSpeed's ZeRO calls ``torch.distributed.all_gather_into_tensor``, which torch marks
  deprecated with a FutureWarning at every step (DeepSpeed's to change, not the user's).
- DeepSpeed warns that it "set the accelerator to CPU" on every CPU process: CPU is what we asked for.
- DeepSpeed prints "DeepSpeed <op> built successfully" (stdout, every rank) when its CPU
  shared-memory collective op is loaded: ``drop_stdout_lines`` around ``init_distributed``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

_WARNINGS = [(r"Transformer Engine and Apex are not installed", UserWarning),
             (r"`torch\.distributed\.[a-z_]+` is deprecated", FutureWarning)]
_DEEPSPEED_LOG = [r"Setting accelerator to CPU"]
BUILD_MESSAGE = r"^DeepSpeed \S+ built successfully$"


class _DropMessages(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def install() -> None:
    if os.environ.get("MOM_DIST_VERBOSE") == "1":
        return
    for pattern, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # DeepSpeed's logger is logging.getLogger("DeepSpeed"): the same object before and after import.
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(_DEEPSPEED_LOG))


class _LineFilter(io.TextIOBase):
    def __init__(self, target, pattern):
        self.target, self.pattern, self.buf = target, re.compile(pattern), ""

    def write(self, s: str) -> int:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if not self.pattern.search(line):
                self.target.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        if self.buf and not self.pattern.search(self.buf):
            self.target.write(self.buf)
        self.buf = ""
        self.target.flush()


@contextlib.contextmanager
def drop_stdout_lines(pattern: str = BUILD_MESSAGE):
    """Drop stdout lines matching ``pattern`` (Python-level prints) inside the block."""
    if os.environ.get("MOM_DIST_VERBOSE") == "1":
        yield
        return
    real = sys.stdout
    filt = _LineFilter(real, pattern)
    sys.stdout = filt
    try:
        yield
    finally:
        filt.flush()
        sys.stdout = real
