"""Per-GPU memory of one training layout: parameters, gradients, optimizer states, activations.

Parameters, fp32 master copies and AdamW states follow how DeepSpeed holds them for our
engine (``mom_dist.parallel.deepspeed_engine``) and are checked byte-exact (up to DeepSpeed's
alignment padding) against a live engine in ``tests/plan/test_plan_measured.py``:

- a rank holds P_n non-module parameters (replicated) and P_m / EP module parameters;
- ZeRO 0: AdamW exp_avg + exp_avg_sq (8 bytes) for every held parameter, plus a full fp32
  master copy (4 bytes) in bf16 (DeepSpeed's unfused bf16 optimizer), none in fp32;
- ZeRO 1/2: an fp32 master partition (4 bytes) and the two AdamW states (8 bytes) of
  P_n / DP + (P_m / EP) / EDP parameters (DP = world, EDP = world / EP).

Gradients and activations are estimates (see ``gradient_bytes``, ``activation_bytes`` and
``logits_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mom_dist.model.config import ModelConfig
from mom_dist.plan.model_size import ParamCounts

REDUCE_BUCKET = 50_000_000  # elements: build_ds_config's reduce_bucket_size


@dataclass
class Memory:
    params: float
    grads: float
    optimizer: float  # fp32 master + AdamW states
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def width(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def held_params(counts: ParamCounts, ep: int) -> float:
    return counts.non_module + counts.module / ep


def optimizer_partition(counts: ParamCounts, ep: int, world: int) -> float:
    """Parameters whose optimizer state one rank keeps under ZeRO 1/2."""
    return counts.non_module / world + (counts.module / ep) / (world // ep)


def param_state_bytes(counts: ParamCounts, ep: int, zero: int, world: int, precision: str) -> dict:
    """Bytes of parameters, fp32 master and AdamW states one rank holds (checked against DeepSpeed)."""
    held = held_params(counts, ep)
    if zero == 0:
        part, master = held, (4 * held if precision == "bf16" else 0.0)
    else:
        part = optimizer_partition(counts, ep, world)
        master = 4 * part
    return dict(params=width(precision) * held, master=master, states=8 * part)


def gradient_bytes(counts: ParamCounts, ep: int, zero: int, world: int, precision: str) -> float:
    """Estimate of gradient memory at its peak (the optimizer step).

    ZeRO 0 and 1 keep a full gradient per held parameter through accumulation (parameter
    width); ZeRO 2 keeps only this rank's partition plus one reduce bucket. Under ZeRO 1/2
    (and ZeRO 0 in bf16) the step converts the partition's gradients to fp32 (4 bytes).
    Not measured: DeepSpeed allocates and frees these buffers inside backward and step.
    """
    held, w = held_params(counts, ep), width(precision)
    if zero == 0:
        return w * held + (4 * held if precision == "bf16" else 0.0)
    part = optimizer_partition(counts, ep, world)
    if zero == 1:
        return w * held + 4 * part
    return w * part + w * min(REDUCE_BUCKET, held) + 4 * part


def activation_bytes(m: ModelConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: bool,
                     skip_attn: float = 0.0, skip_ffn: float = 0.0) -> float:
    """Estimate of the tensors autograd keeps for one micro-batch (flash/memory-efficient
    attention: no S x S matrices), counted from what each operation saves:

    - dense GPT-2 block: 17 x T x d (LN inputs and outputs, q/k/v, attention output, 4d GELU
      input and output); with checkpointing only its input (T x d);
    - routing step, per pool: the router (input + GRU gates, ~d + 12 r per token, fp32 softmax
      outputs) and the shared LayerNorm input; rows dispatched to modules (M = T x K x (1 -
      SKIP share)): attention 8 d per row (normalised rows, affine, QKV/attention rows, output
      rows) + d per token, FFN 14 d per row (4d GELU input and output); with checkpointing the
      module compute and attention core are recomputed: attention keeps 5 d per row (the q/k/v
      views count as rows), FFN 5 d per row. (Coefficients counted from the saved tensors of a
      small model; ``tests/plan`` compares the total with autograd's saved tensors.)
    - LM head: final LayerNorm (2 d) and the fp32 log-softmax of the loss (4 bytes x V).
    """
    a = width(precision)
    T = micro_batch * seq_len
    d, C = m.d_model, m.n_classes
    n_blocks = m.n_bottom + m.n_top + (m.n_chunks if m.anchor else 0)
    elems = n_blocks * T * d * (1 if checkpointing else 17)
    steps = m.n_chunks * m.n_steps
    fp32 = 0.0
    for r, skip, per_row, per_tok in (
            (m.attn_router, skip_attn, (5 if checkpointing else 8), (0 if checkpointing else 1)),
            (m.ffn_router, skip_ffn, (5 if checkpointing else 14), 0)):
        rows = T * r.top_k * (1.0 - skip)
        router = T * (d + (12 * r.dim if r.kind == "gru" else 2 * r.dim))
        elems += steps * (router + T * d + rows * d * per_row + T * d * per_tok)
        fp32 += steps * 2 * T * C * 4  # logits and probabilities (z-loss, balance loss)
    elems += 2 * T * d
    fp32 += T * m.vocab_size * 4
    return elems * a + fp32


def logits_bytes(m: ModelConfig, micro_batch: int, seq_len: int, precision: str) -> float:
    """Logits the model output holds through backward (T x V at activation width) and the
    fp32 gradient of the log-softmax backward allocates (2 x T x V x 4): on top of the saved
    tensors at the start of backward, the largest moment for big vocabularies."""
    return micro_batch * seq_len * m.vocab_size * (width(precision) + 8)


def layout_memory(counts: ParamCounts, m: ModelConfig, *, ep: int, zero: int, world: int, precision: str,
                  micro_batch: int, seq_len: int, checkpointing: bool, skip_attn: float = 0.0,
                  skip_ffn: float = 0.0) -> Memory:
    ps = param_state_bytes(counts, ep, zero, world, precision)
    return Memory(params=ps["params"], grads=gradient_bytes(counts, ep, zero, world, precision),
                  optimizer=ps["master"] + ps["states"],
                  activations=activation_bytes(m, micro_batch, seq_len, precision, checkpointing, skip_attn, skip_ffn)
                  + logits_bytes(m, micro_batch, seq_len, precision))
