"""The run configuration: model, training recipe, parallel layout and data, loaded from YAML.

    cfg = load_config("configs/tiny.yaml", ["model.n_steps=4", "train.lr=3e-4"])

Sections are validated dataclasses (unknown keys and impossible combinations raise
``ValueError`` naming the field and the fix). Training defaults are the reference recipe of
spec §8 (AdamW 1e-3, betas (0.9, 0.95), eps 1e-5, wd 0.1, clip 1.0, cosine, warmup 500/5000,
seed 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mom_dist.config_utils import apply_overrides, check, check_choice, checked_fields, from_dict, load_yaml, to_dict
from mom_dist.model.compile import COMPILE_BACKENDS, COMPILE_CHOICES
from mom_dist.model.config import ModelConfig


@dataclass
class TrainConfig:
    seed: int = 1
    steps: int = 5000  # optimizer steps
    global_batch_size: int = 512  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per rank per forward
    seq_len: int = 1024
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 500
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # by the global norm over module and non-module parameters
    precision: str = "fp32"  # fp32 | bf16
    # torch.compile of the model's forward and backward (mom_dist.model.compile). auto: on with
    # CUDA (2.1x on an H200), off on CPU (measured: benchmarks/results/compile.md).
    compile: str = "auto"  # auto | on | off
    compile_backend: str = "inductor"  # inductor | aot_eager (no generated kernels: to debug a compile)
    optimizer: str = "adamw"  # adamw (torch) | deepspeed_adam (DeepSpeed fused/CPU Adam, JIT-built)
    init_from: str | None = None  # phase 2 (spec §8): a GPT-2 HF directory or a mom_dist checkpoint
    out_dir: str = "runs/default"
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 10  # validation micro-batches in total (the same samples for every layout)
    save_interval: int = 1000  # 0: no checkpoints at all (benchmarks, tests)
    stop_after: int | None = None  # leave (with a checkpoint) after this many steps in this launch
    keep_last: int = 2  # checkpoints kept (older ones deleted after a newer one is complete)
    max_nonfinite_steps: int = 3  # consecutive non-finite steps (updates skipped) before exit code 3
    # Opt-in loss-spike guard: a step whose loss exceeds this x the median loss of the last 20
    # accepted steps is skipped like a non-finite one (train/divergence.py). null: off.
    max_loss_ratio: float | None = None
    telemetry_interval: int = 50
    tensorboard: bool = True

    def validate(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len", "log_interval",
                     "eval_interval", "telemetry_interval"):
            check(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)} must be >= 1")
        check(self.save_interval >= 0, "train.save_interval must be >= 0 (0 disables checkpoints)")
        check(self.stop_after is None or self.stop_after >= 1, "train.stop_after must be >= 1 or null")
        check(self.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1")
        check(self.max_loss_ratio is None or (isinstance(self.max_loss_ratio, (int, float))
                                              and not isinstance(self.max_loss_ratio, bool) and self.max_loss_ratio > 1),
              f"train.max_loss_ratio={self.max_loss_ratio!r} must be a number > 1 (e.g. 3: skip steps whose loss is over "
              "3x the recent median), or null to turn the loss-spike guard off")
        check(self.eval_batches >= 0 and self.warmup_steps >= 0 and self.keep_last >= 1,
              "train.eval_batches and train.warmup_steps must be >= 0, train.keep_last >= 1")
        check(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
        check(len(self.betas) == 2, f"train.betas={self.betas} must be two numbers, e.g. [0.9, 0.95]")
        self.betas = tuple(float(b) for b in self.betas)  # Config(...) built in code skips from_dict
        check_choice(self.precision, ("fp32", "bf16"), "train.precision")
        check_choice(self.compile, COMPILE_CHOICES, "train.compile")
        check_choice(self.compile_backend, COMPILE_BACKENDS, "train.compile_backend")
        check_choice(self.optimizer, ("adamw", "deepspeed_adam"), "train.optimizer")


@dataclass
class ParallelConfig:
    ep_size: int = 1  # expert-parallel group size; world = ep_size x expert-data-parallel
    zero_stage: int = 1  # 0, 1 or 2 (ZeRO-3 cannot partition expert-parallel modules)
    dispatcher: str = "dropless"  # dropless | capacity
    capacity_factor: float = 1.25  # capacity mode: rows per module per source = ceil(cf*T*K/N)
    ds_config: str | None = None  # a user DeepSpeed JSON merged over the generated one
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    # After set-up, a collective that waits longer than this for a rank ends the job (exit 4,
    # naming the silent rank). Set-up (rendezvous, data index, engine, load) gets max(600, this).
    collective_timeout_s: float = 600.0

    def validate(self) -> None:
        check(self.ep_size >= 1, f"parallel.ep_size={self.ep_size} must be >= 1")
        check(self.zero_stage != 3,
              "parallel.zero_stage=3 is not supported: ZeRO-3 partitions every parameter across all "
              "data-parallel ranks, but expert-parallel modules live on their own ranks (DeepSpeed: "
              "'MoE not supported with Stage 3'); use zero_stage 1 or 2")
        check_choice(self.zero_stage, (0, 1, 2), "parallel.zero_stage")
        check_choice(self.dispatcher, ("dropless", "capacity"), "parallel.dispatcher")
        check(self.capacity_factor > 0, f"parallel.capacity_factor={self.capacity_factor} must be > 0")
        check_choice(self.backend, ("auto", "nccl", "gloo"), "parallel.backend")
        check(self.collective_timeout_s >= 5, f"parallel.collective_timeout_s={self.collective_timeout_s} must be "
              ">= 5 seconds (a step's slowest collective must fit; 600 is the default)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: dict = field(default_factory=dict)  # mom_dist.data.data_config.DataConfig (types checked here)

    def validate(self) -> None:
        m, t, p = self.model, self.train, self.parallel
        check_data_section(self.data)
        m.validate()
        t.validate()
        p.validate()
        check(t.seq_len <= m.max_seq_len,
              f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len} (learned positions); "
              "raise model.max_seq_len or lower train.seq_len")
        for name, n in (("n_attn_modules", m.n_attn_modules), ("n_ffn_modules", m.n_ffn_modules)):
            check(n % p.ep_size == 0,
                  f"parallel.ep_size={p.ep_size} must divide model.{name}={n} (each rank holds "
                  f"{name}/ep_size modules); pick ep_size in {[e for e in range(1, n + 1) if n % e == 0]}")

    def to_dict(self) -> dict:
        return to_dict(self)


def check_data_section(data: dict) -> None:
    """Types of the ``data`` section's fields (its values are checked by the trainer's loader,
    which needs the files): ``mom_dist.data.data_config.DataConfig``, or ``{synthetic: {seed: N}}``."""
    check(isinstance(data, dict), f"data={data!r} must be a section (a mapping), e.g. data: {{synthetic: {{seed: 1}}}}")
    synthetic = data.get("synthetic")
    if "synthetic" in data:
        if isinstance(synthetic, dict) and set(synthetic) <= {"seed"}:  # other shapes: the trainer names them
            checked_fields(SyntheticDataConfig, synthetic, "data.synthetic.")
        return
    from mom_dist.data.data_config import DataConfig

    checked_fields(DataConfig, data, "data.")


@dataclass
class SyntheticDataConfig:
    seed: int = 1234  # deterministic synthetic token sequences (mom_dist.train.batches)


def check_world(ep_size: int, world: int) -> None:
    """The trainer's rule for a world size (also used by ``mom-plan`` to enumerate layouts)."""
    check(world % ep_size == 0, f"parallel.ep_size={ep_size} must divide the world size {world}: "
                                f"launch a multiple of {ep_size} ranks or change ep_size")


def accumulation_steps(train: TrainConfig, dp_size: int) -> int:
    """Micro-batches per rank per optimizer step; the global batch must split evenly."""
    per_step = train.micro_batch_size * dp_size
    check(train.global_batch_size % per_step == 0,
          f"train.global_batch_size={train.global_batch_size} must be a multiple of "
          f"micro_batch_size x data-parallel ranks = {train.micro_batch_size} x {dp_size}; "
          "adjust the batch sizes or the number of ranks")
    return train.global_batch_size // per_step


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides)
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, default=str)
