"""mom_dist: distributed training of Mixture-of-Modules (MoM) language models.

The model (``mom_dist.model``) is a plain ``nn.Module`` that runs in one process; expert
parallelism (``mom_dist.parallel``) and DeepSpeed (``mom_dist.parallel.deepspeed_engine``) are
applied to it from outside. Data preparation lives in ``mom_dist.data``, training in
``mom_dist.train``, checkpoint files in ``mom_dist.checkpoint`` and conversion to other formats
in ``mom_dist.convert`` (the floors of the house: docs/architecture.md).
"""

__version__ = "0.1.0"

from mom_dist import quiet as _quiet

_quiet.install()  # before megatron/DeepSpeed are imported: silence their known import noise
