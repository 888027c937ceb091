"""The grouped matmul of the module pools as a ``torch.library`` custom op, for ``torch.compile``.

Eager code calls ``torch._grouped_mm`` (or a loop over module slices) directly: see
``dispatch.grouped_linear``. Under ``torch.compile`` two of those calls cannot be traced:

- ``torch._grouped_mm`` on anything but bf16: its fake-tensor (meta) function accepts only bf16
  ("Expected inputs of BF16 type"), although the CPU kernel computes fp32 too;
- the loop fallback: it reads the slice sizes on the host, a data-dependent graph break at
  every pool call (20 graphs per MoM-small step on the H200).

``mom_dist::grouped_mm`` hides either behind an op whose output shape Dynamo knows without
running it (``(M, O)``: the rows of ``x`` times the output width of ``w``), and whose backward
is written with two more such ops, so a compiled step keeps one graph on every path. bf16 with
the kernel stays on ``torch._grouped_mm`` under compile too: Dynamo traces it natively, as
measured on the H200 (one graph, 2.1x eager), and nothing is gained by hiding it.

Rows are grouped by module: module i owns rows ``[ends[i-1], ends[i])`` and ``ends[-1]`` is the
number of rows (padding rows belong to the last group, see ``dispatch.Groups.mm_ends``).
"""

from __future__ import annotations

import torch


def grouped_mm_kernel_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can compute ``x`` (M, I) by ``w`` (N, I, O) here."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9):
        return False
    align = 16 // x.element_size()  # _grouped_mm needs 16-byte aligned strides
    return x.shape[-1] % align == 0 and w.shape[-1] % align == 0 and x.is_contiguous()


def loop_mm(x_MI: torch.Tensor, w_NIO: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Row slice i (``sizes[i]`` rows; the last slice takes every remaining row) times ``w[i]``."""
    pieces, start = [], 0
    for i, n in enumerate(sizes):
        if i == len(sizes) - 1:
            n = x_MI.shape[0] - start  # padding rows ride with the last module
        pieces.append(x_MI[start:start + n] @ w_NIO[i])
        start += n
    return torch.cat(pieces)


def _sizes(ends_N: torch.Tensor) -> list[int]:
    ends = ends_N.tolist()  # the loop's one host read per call (inside the op: no graph break)
    return [e - s for s, e in zip([0] + ends[:-1], ends)]


# (schemas spelled out: the same on every torch version, whatever its annotation parsing)
@torch.library.custom_op("mom_dist::grouped_mm", mutates_args=(),
                         schema="(Tensor x_MI, Tensor w_NIO, Tensor ends_N, bool kernel) -> Tensor")
def grouped_mm(x_MI: torch.Tensor, w_NIO: torch.Tensor, ends_N: torch.Tensor, kernel: bool) -> torch.Tensor:
    """Row r times ``w[module of r]`` -> (M, O); ``kernel``: ``torch._grouped_mm``, else the loop."""
    if kernel:
        return torch._grouped_mm(x_MI, w_NIO, offs=ends_N)
    return loop_mm(x_MI, w_NIO, _sizes(ends_N))


@grouped_mm.register_fake
def _(x_MI, w_NIO, ends_N, kernel):
    return x_MI.new_empty(x_MI.shape[0], w_NIO.shape[-1])


@torch.library.custom_op("mom_dist::grouped_mm_weight_grad", mutates_args=(),
                         schema="(Tensor x_MI, Tensor dy_MO, Tensor ends_N, bool kernel) -> Tensor")
def grouped_mm_weight_grad(x_MI: torch.Tensor, dy_MO: torch.Tensor, ends_N: torch.Tensor,
                           kernel: bool) -> torch.Tensor:
    """Gradient of the stacked weights: ``x_i^T @ dy_i`` per module -> (N, I, O); zero for a
    module without rows."""
    if kernel:
        return torch._grouped_mm(x_MI.t(), dy_MO, offs=ends_N)
    start, out = 0, x_MI.new_zeros(ends_N.shape[0], x_MI.shape[1], dy_MO.shape[1])
    for i, n in enumerate(_sizes(ends_N)):
        if i == ends_N.shape[0] - 1:
            n = x_MI.shape[0] - start
        out[i] = x_MI[start:start + n].t() @ dy_MO[start:start + n]
        start += n
    return out


@grouped_mm_weight_grad.register_fake
def _(x_MI, dy_MO, ends_N, kernel):
    return x_MI.new_empty(ends_N.shape[0], x_MI.shape[1], dy_MO.shape[1])


def _setup_context(ctx, inputs, output):
    x_MI, w_NIO, ends_N, kernel = inputs
    ctx.save_for_backward(x_MI, w_NIO, ends_N)
    ctx.kernel = kernel


def _backward(ctx, dy_MO):
    x_MI, w_NIO, ends_N = ctx.saved_tensors
    dy_MO = dy_MO.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # (dy_MO rows of module i) @ w[i]^T; the kernel reads the transposed view in place
        dx = grouped_mm(dy_MO, w_NIO.transpose(-2, -1), ends_N, ctx.kernel)
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_weight_grad(x_MI, dy_MO, ends_N, ctx.kernel)
    return dx, dw, None, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
