"""Per-GPU memory of one training layout: parameters, gradients, optimizer states, activations.

Parameters, fp32 master copies and AdamW states follow how DeepSpeed holds them for our
engine (``mom_dist.parallel.deepspeed_engine``) and are checked byte-exact (up to DeepSpeed's
alignment padding) against a live engine in ``tests/plan/test_plan_measured.py``:

- a rank holds P_n non-module parameters (replicated) and P_m / EP module parameters;
- ZeRO 0: AdamW exp_avg + exp_avg_sq (8 bytes) for every held parameter, plus a full fp32
  master copy (4 bytes) in bf16 (DeepSpeed's unfused bf16 optimizer), none in fp32;
- ZeRO 1/2: an fp32 master partition (4 bytes) and the two AdamW states (8 bytes) of
  P_n / DP + (P_m / EP) / EDP parameters (DP = world, EDP = world / EP).

Activations are counted from the tensors each operation saves (``forward_activation_bytes``)
and checked against the CPU allocator within 2% for ep_size 1 (``tests/plan/test_efficiency.py``);
gradients (``gradient_bytes``), the backward's logit gradient (``logits_bytes``) and activations
at ep_size > 1 are estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

from mom_dist.model.config import ModelConfig
from mom_dist.plan.model_size import ParamCounts, rows_per_token, weights_need_grad

REDUCE_BUCKET = 50_000_000  # elements: build_ds_config's reduce_bucket_size
RNG_STATE_BYTES = 5056  # torch.get_rng_state(): checkpoint keeps one per call (preserve_rng_state)


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


@dataclass
class Activations:
    """Bytes a training forward (loss included) leaves allocated until backward, by part."""

    blocks: float  # dense GPT-2 blocks (bottom, anchors, top), their input included
    steps: float  # routing steps: residual stream, module rows, attention, dispatch indices
    routers: float  # router states, scores and probabilities, loss inputs
    head: float  # final LayerNorm, the logits (the model's output) and the fp32 log-softmax

    @property
    def total(self) -> float:
        return self.blocks + self.steps + self.routers + self.head


def forward_activation_bytes(m: ModelConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: bool,
                             skip_attn: float = 0.0, skip_ffn: float = 0.0,
                             skip_rows_computed: bool = True) -> Activations:
    """What one training forward of ``micro_batch`` x ``seq_len`` tokens keeps for backward,
    counted from the tensors each operation saves (T tokens, d width, activations at the
    parameter width a; router probabilities, LayerNorm statistics and attention log-sum-exp in
    fp32; dispatch indices int64). Per token:

    - dense block: 16 d (input, both LayerNorm outputs, QKV, attention output, mid residual,
      4 d GELU input and output), 4 LayerNorm statistics and one log-sum-exp per head; with
      checkpointing only its input (d) and the CPU RNG state (5056 bytes per checkpointed call);
    - routing step: the residual before and after attention (2 d), 2 x 2 LayerNorm statistics;
      per attention row (rows = K picks, see ``rows_per_token``): normalised row, gathered
      affine, affine output, combined QKV (3 d), attention row, output row (if the pick weights
      carry a gradient) and weighted output (8-9 d; checkpointing recomputes the first two: 6-7 d),
      per token the mixed QKV (3 d) and the attention output (d; recomputed with checkpointing);
      per FFN row the normalised row, affine, its output, the 4 d GELU input and output, output
      row (if weighted with a gradient) and weighted output (12-13 d; checkpointing keeps only
      the input row and the outputs: 2-3 d); per row a one-hot (N), 1-2 combine scales and 1-2
      int64 indices (with checkpointing also the plan's module id and valid flag: 9 bytes, and
      an RNG state per checkpointed call, 4 per step);
    - router, per step: GRU cell 7 r (+ r for the zero state at a chunk's start), MLP r; fp32
      scores and probabilities (2 C), two log-sum-exp values of the z-loss, K int64 picks
      (+ K + 1 fp32 for renormalised K > 1 weights, + C for the release's double softmax);
    - LM head: final LayerNorm input and output (2 d), logits (V at width a), fp32 log-softmax (4 V).

    Checked against the CPU allocator (``tests/plan/test_efficiency.py``: within 2%). On CUDA
    the fused GRU cell keeps 2 r less per router step; a math (non-flash) attention would keep
    S x S scores. Not modelled: ``mask_skip_keys``, the capacity dispatcher and the all-to-all
    dispatcher's buffers (ep_size > 1: rows scaled by the non-SKIP share, an estimate).
    """
    a = width(precision)
    T, d, C = micro_batch * seq_len, m.d_model, m.n_classes
    ac = checkpointing
    n_blocks = m.n_bottom + m.n_top + (m.n_chunks if m.anchor else 0)
    blocks = n_blocks * (T * d * a + RNG_STATE_BYTES if ac else T * (16 * d * a + (4 + m.n_heads) * 4))

    ra = rows_per_token(m.attn_router, skip_attn, skip_rows_computed)
    rf = rows_per_token(m.ffn_router, skip_ffn, skip_rows_computed)
    wa, wf = weights_need_grad(m.attn_router), weights_need_grad(m.ffn_router)
    qkv_row = 3 * d * (2 if m.qkv_weighted and wa else 1)  # combined QKV (+ unweighted rows if weighted)
    attn_row = qkv_row + (3 if ac else 5) * d + (d if wa else 0)
    ffn_row = (2 if ac else 12) * d + (d if wf else 0)
    scales_a = (2 if wa else 1) + (2 if m.qkv_weighted and wa else 1)  # output and QKV combine
    scales_f = 2 if wf else 1
    per_token = 2 * d + (3 * d if ac else 4 * d)
    step_bytes = (a * (per_token + ra * (attn_row + m.n_attn_modules + scales_a)
                       + rf * (ffn_row + m.n_ffn_modules + scales_f))
                  + 8 * (ra * (1 + wa) + rf * (1 + wf)) + 4 * (4 + (0 if ac else m.n_heads)))
    if ac:  # checkpoint keeps its inputs: the plans' row -> module ids (int64) and valid flags
        step_bytes += 9 * (ra + rf)
    steps = m.n_chunks * m.n_steps * (T * step_bytes + (4 * RNG_STATE_BYTES if ac else 0))

    routers = 0.0
    for r in (m.attn_router, m.ffn_router):
        state = 7 * r.dim if r.kind == "gru" else r.dim
        fp32 = 2 * C + 2 + (r.top_k + 1 if r.weighting == "renorm" and r.top_k > 1 else 0)
        fp32 += C if m.balance_double_softmax else 0
        routers += m.n_chunks * m.n_steps * T * (a * state + 4 * fp32 + 8 * r.top_k)
        routers += m.n_chunks * T * a * r.dim if r.kind == "gru" else 0  # zero state at a chunk's start

    head = T * (2 * d * a + 2 * 4 + m.vocab_size * (a + 4)) + 8 * seq_len  # + the position ids
    return Activations(float(blocks), float(steps), float(routers), float(head))


def activation_bytes(m: ModelConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: bool,
                     skip_attn: float = 0.0, skip_ffn: float = 0.0, skip_rows_computed: bool = True) -> float:
    """Total of ``forward_activation_bytes``."""
    return forward_activation_bytes(m, micro_batch, seq_len, precision, checkpointing, skip_attn, skip_ffn,
                                    skip_rows_computed).total


def logits_bytes(m: ModelConfig, micro_batch: int, seq_len: int) -> float:
    """The fp32 gradient of the log-softmax backward allocates (2 x T x V x 4) on top of what
    the forward kept: for big vocabularies, the peak of a training step."""
    return micro_batch * seq_len * m.vocab_size * 8


def layout_memory(counts: ParamCounts, m: ModelConfig, *, ep: int, zero: int, world: int, precision: str,
                  micro_batch: int, seq_len: int, checkpointing: bool, skip_attn: float = 0.0,
                  skip_ffn: float = 0.0) -> Memory:
    ps = param_state_bytes(counts, ep, zero, world, precision)
    return Memory(params=ps["params"], grads=gradient_bytes(counts, ep, zero, world, precision),
                  optimizer=ps["master"] + ps["states"],
                  activations=activation_bytes(m, micro_batch, seq_len, precision, checkpointing, skip_attn, skip_ffn,
                                               skip_rows_computed=ep == 1)
                  + logits_bytes(m, micro_batch, seq_len))
