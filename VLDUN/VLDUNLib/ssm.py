"""Selective state-space (Mamba) layers for VL-DUN's Bi-Mamba branches.

VL-DUN uses a bidirectional Mamba layer twice per unfolding stage: in the AMGDM to spread the residual
error ``Phi x - y`` over the whole image, and in the MDPMM high-frequency branch (Section 3.4 of the paper).
Mamba itself is Gu & Dao (2023), "Mamba: Linear-time sequence modeling with selective state spaces".

``selective_scan`` has the semantics of ``mamba_ssm``'s ``selective_scan_fn``. It calls the CUDA kernel when
``mamba_ssm`` imports and the tensors live on a GPU, and otherwise a pure-PyTorch scan built on
``_scan_into``: a two-level chunked linear scan (a loop over ~sqrt(L) positions vectorised over all chunks, a
loop over the chunk carries, then a second pass that rewrites each chunk from its true initial state).
Nothing exponentiates a cumulative sum, so large step sizes underflow to zero instead of overflowing. Long
sequences are cut into segments. With autograd each segment is one ``_SelectiveSegment``: it keeps only its
(b, l, d)-sized inputs and its backward recomputes the states, runs the reversed scan for the state
gradients and reduces them to every input in a few whole-segment passes, so training never keeps more than
one segment's (b, l, n, d) state. Inference (no autograd) reuses one set of segment buffers and does the
elementwise work (softplus, D skip, silu gate) per segment in the layers' (b, L, d) token layout: fresh
8 MiB buffers page-fault, and whole-tensor elementwise passes are memory-bound, each costing about as much
as the arithmetic of the scan itself.

Speed against a plain loop and mambapy's Blelloch ``pscan`` is measured by ``vldun benchmark`` (the lab);
the development notes are in docs/. CPU training routes the scan through the lab's compiled kernel
(``use_cpu_scan``), 2.4x faster per training step; the product itself never needs a compiler.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Backend = Literal["auto", "torch", "cuda"]

_CPU_SEGMENT_ELEMENTS = 1 << 21
"""Largest (b, l, d, n) state the PyTorch scan builds at once on CPU: 8 MiB in fp32 stays cache-resident,
which measured faster than whole-sequence states even counting the backward's recomputation."""

_GPU_SEGMENT_ELEMENTS = 1 << 26
"""The same bound on GPUs, where bigger segments mean fewer kernel launches (256 MiB per fp32 state)."""

_DT_MIN, _DT_MAX, _DT_FLOOR = 1e-3, 1e-1, 1e-4

CpuScan = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, bool], Tensor]
_cpu_scan: Optional[CpuScan] = None


def use_cpu_scan(scan: Optional[CpuScan]) -> None:
    """Run fp32 CPU scans through ``scan(u, delta, A, B, C, reverse) -> y`` instead of the PyTorch scan.

    Token layout: u, delta (after softplus), y (b, L, d); B, C (b, L, n); A (d, n). The lab's training plugs in
    its compiled kernel here (``vldun_lab.cpu_scan``); ``None`` restores the PyTorch scan. The product never
    sets it: Slicer users have no compiler.
    """
    global _cpu_scan
    _cpu_scan = scan


@functools.cache
def _cuda_selective_scan() -> Optional[Callable[..., Tensor]]:
    """Import mamba_ssm's fused kernel once; None where it cannot load (it needs a CUDA build).

    mamba-ssm 2.3 and later import without their compiled kernel (`selective_scan_cuda` is then None and
    each call raises), so the kernel itself is checked, not only the import.
    """
    try:
        from mamba_ssm.ops import selective_scan_interface as interface
    except (ImportError, OSError):
        return None
    return interface.selective_scan_fn if getattr(interface, "selective_scan_cuda", None) is not None else None


MAMBA_INSTALL = "MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation"
"""mamba-ssm 2.3 and later leave the CUDA selective scan out of a plain `pip install mamba-ssm`."""


def missing_cuda_scan(device: torch.device) -> Optional[str]:
    """What to install when a GPU would run the pure-PyTorch scan; None on the CPU or with the kernel.

    On an H100 the kernel made the paper preset 6x faster (bf16, batch 64: 3.0 against 19.3 ms per slice).
    """
    if device.type != "cuda" or _cuda_selective_scan() is not None:
        return None
    return ("mamba_ssm's CUDA selective scan is not installed, so this GPU runs the pure-PyTorch scan, about 6x "
            f"slower; install it with `{MAMBA_INSTALL}`")


def cuda_scan_available() -> bool:
    """True when mamba_ssm's CUDA selective scan imports and a GPU is present."""
    return torch.cuda.is_available() and _cuda_selective_scan() is not None


def _chunk_length(length: int) -> int:
    """Chunk length T = floor(sqrt(L)), which balances the two Python loops (T steps and L/T carries)."""
    return max(1, math.isqrt(length))


def _scan_into(out: Tensor, a: Tensor, b: Tensor, h0: Optional[Tensor], reverse: bool,
               prod: Optional[Tensor] = None) -> None:
    """Write h_t = a_t * h_{t-1} + b_t into ``out`` (all (P, L, N)); h before the first step is ``h0`` or 0.

    With ``reverse`` the recurrence runs from t = L-1 down to 0. Two-level scheme: L is cut into chunks of
    T positions; pass 1 loops over T to get every chunk's end state (from 0) and product of a, a short loop
    chains those into each chunk's true initial state, and pass 2 loops over T again writing the states.
    Each step touches all chunks at once, so Python overhead is O(sqrt(L)) and no cumulative product of
    the whole chunk is ever stored. Positions that do not fill a chunk run sequentially at the far end.
    ``prod`` (P, L // T, N), each chunk's product of a, spares pass 1 that product where the caller has it
    in closed form (see _chunk_decay).
    """
    batch, length, width = b.shape
    size = _chunk_length(length)
    count = length // size
    covered = slice(length - count * size, length) if reverse else slice(0, count * size)
    a_c, b_c, out_c = (x[:, covered].unflatten(1, (count, size)).unbind(2) for x in (a, b, out))
    steps = range(size - 1, -1, -1) if reverse else range(size)
    end = b_c[steps[0]].clone()
    multiply = prod is None
    prod = a_c[steps[0]].clone() if multiply else prod
    for t in steps[1:]:
        end = torch.addcmul(b_c[t], a_c[t], end)
        if multiply:
            prod.mul_(a_c[t])
    start = torch.empty_like(end)
    carry = h0 if h0 is not None else b.new_zeros(batch, width)
    starts, ends, prods = start.unbind(1), end.unbind(1), prod.unbind(1)
    for c in (reversed(range(count)) if reverse else range(count)):
        starts[c].copy_(carry)
        carry = torch.addcmul(ends[c], prods[c], carry)
    state = start
    for t in steps:
        state = torch.addcmul(b_c[t], a_c[t], state, out=out_c[t])
    rest = range(length - count * size - 1, -1, -1) if reverse else range(count * size, length)
    for t in rest:
        carry = torch.addcmul(b[:, t], a[:, t], carry, out=out[:, t])


def discretize(delta: Tensor, A: Tensor, B: Tensor, u: Tensor,
               out: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Discretized SSM coefficients, Eq. (4) of Gu & Dao (2023) as Mamba implements it.

    A_bar = exp(delta A) (zero-order hold) and B_bar u = delta B u (the Euler simplification of the ZOH B
    used by mamba_ssm). delta, u: (b, l, d); A: (d, n); B: (b, l, n). Returns two (b, l, n, d) tensors,
    written into ``out`` when given (no autograd). The state index n comes before d because broadcasting
    over a contiguous d runs twice as fast on the CPU as over the short n.
    """
    a_bar, bu_bar = out if out is not None else (None, None)
    a_bar = torch.mul(delta.unsqueeze(2), A.t().contiguous(), out=a_bar).exp_()
    bu_bar = torch.mul((delta * u).unsqueeze(2), B.unsqueeze(-1), out=bu_bar)
    return a_bar, bu_bar


def readout(h: Tensor, C: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """y_t = C_t h_t, Eq. (2b) of Gu & Dao (2023), for states h (b, l, n, d) and C (b, l, n): y (b, l, d).

    n strided multiply-adds: on the CPU they ran 2x faster than einsum's batched (1 x n) @ (n x d) products.
    """
    y = torch.mul(h[:, :, 0], C[:, :, 0:1], out=out)
    for k in range(1, h.shape[2]):
        y = y.addcmul_(h[:, :, k], C[:, :, k : k + 1])
    return y


def _chunk_decay(delta: Tensor, A: Tensor, reverse: bool = False) -> Tensor:
    """Each scan chunk's product of A_bar = exp(delta A) in closed form, exp(A * sum of its deltas): (b, chunks, n*d).

    One exp per chunk instead of a multiply per position; the chunks are _scan_into's for the same ``reverse``.
    """
    length = delta.shape[1]
    size = _chunk_length(length)
    count = length // size
    covered = slice(length - count * size, length) if reverse else slice(0, count * size)
    sums = delta[:, covered].unflatten(1, (count, size)).sum(2)
    return torch.mul(sums.unsqueeze(2), A.t()).exp_().flatten(2)


def _states(delta: Tensor, A: Tensor, B: Tensor, u: Tensor, h0: Optional[Tensor],
            out: Optional[tuple[Tensor, Tensor, Tensor]] = None,
            reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """A_bar, B_bar u and the states h of Eq. (2a), all (b, l, n, d), in ``out`` or in fresh tensors.

    ``reverse`` runs the recurrence from the last position to the first (h0 then precedes position l-1).

    The buffers are allocated, never left to the product of the strided token views: that would keep their
    strides, and the scan would then write into a flattened copy instead of h.
    """
    shape = (*u.shape[:2], A.shape[1], u.shape[2])
    a_bar, bu_bar, h = out if out is not None else (u.new_empty(shape, dtype=A.dtype) for _ in range(3))
    discretize(delta, A, B, u, out=(a_bar, bu_bar))
    _scan_into(h.flatten(2), a_bar.flatten(2), bu_bar.flatten(2), h0, reverse, _chunk_decay(delta, A, reverse))
    return a_bar, bu_bar, h


def _reduce_d(x: Tensor, v: Tensor, work: Tensor) -> Tensor:
    """sum_d x[b, l, n, d] v[b, l, d] -> (b, l, n), through ``work`` (x's shape) as scratch."""
    return torch.mul(x, v.unsqueeze(2), out=work).sum(-1)


class _SelectiveSegment(torch.autograd.Function):
    """One segment of the selective scan, Eq. (2a)-(2b) and (4) of Gu & Dao (2023), with a hand-written backward.

    Saves only its (b, l, d)-sized inputs and recomputes the states in the backward pass, as checkpointing
    did, but then takes every gradient in a few whole-segment passes. Autograd through the n readout
    slices had zero-filled and summed a full (b, l, n, d) gradient per slice, over half of a CPU training step.
    Backward: G = dL/dh, from y (C G) and the next state (reversed scan: G_t += A_bar_{t+1} G_{t+1});
    dB_bar u = G; dA_bar_t = G_t h_{t-1}; through A_bar = exp(delta A) and B_bar u = delta B u to the inputs.
    """

    @staticmethod
    def forward(ctx, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, u: Tensor,
                h0: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        _, _, h = _states(delta, A, B, u, h0)
        ctx.save_for_backward(delta, A, B, C, u, h0)
        return readout(h, C), h[:, -1].flatten(1).clone()

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_last: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        delta, A, B, C, u, h0 = ctx.saved_tensors
        a_bar, g, h = _states(delta, A, B, u, h0)
        grad_y = grad_y.contiguous()
        torch.mul(C.unsqueeze(-1), grad_y.unsqueeze(2), out=g)
        if grad_last is not None:
            g[:, -1] += grad_last.reshape_as(g[:, -1])
        flat_g, flat_a = g.flatten(2), a_bar.flatten(2)
        if g.shape[1] > 1:
            _scan_into(flat_g[:, :-1], flat_a[:, 1:], flat_g[:, :-1], flat_g[:, -1], True)
        grad_h0 = (flat_g[:, 0] * flat_a[:, 0]) if h0 is not None else None
        ga = a_bar.mul_(g)
        ga[:, 1:].mul_(h[:, :-1])
        if h0 is not None:
            ga[:, 0].mul_(h0.reshape_as(ga[:, 0]))
        else:
            ga[:, 0].zero_()
        grad_C = _reduce_d(h, grad_y, h)
        grad_bu = readout(g, B)
        grad_B = _reduce_d(g, delta * u, h)
        grad_A = torch.mul(ga, delta.unsqueeze(2), out=h).sum((0, 1)).t()
        grad_delta = torch.mul(ga, A.t(), out=h).sum(2).addcmul_(grad_bu, u)
        return grad_delta, grad_A, grad_B, grad_C, grad_bu * delta, grad_h0


class _Workspace:
    """Buffers reused by every segment of a no-grad scan: three (b, l, n, d) states and the (b, L, d) output.

    A fresh 8 MiB tensor per segment and coefficient cost page faults that took as long as the arithmetic
    (measured: 25 ms against 13 ms per 2**21-element segment on the 2-core Xeon, one thread).
    """

    def __init__(self, u: Tensor, step: int, A: Tensor) -> None:
        batch, length, dim = u.shape
        self.a, self.b, self.h = (u.new_empty(batch, min(step, length), A.shape[1], dim, dtype=A.dtype)
                                  for _ in range(3))
        self.y = u.new_empty(batch, length, dim, dtype=A.dtype)

    def segment(self, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, u: Tensor, h0: Optional[Tensor],
                part: slice, reverse: bool) -> tuple[Tensor, Tensor]:
        """_SelectiveSegment's forward without autograd, in the buffers; y lands in positions ``part`` of the output.

        Returns y and the state the next segment starts from: the last position's, or the first's with ``reverse``.
        """
        length = u.shape[1]
        buffers = (self.a[:, :length], self.b[:, :length], self.h[:, :length])
        _, _, h = _states(delta, A, B, u, h0, buffers, reverse)
        return readout(h, C, out=self.y[:, part]), h[:, 0 if reverse else -1].flatten(1).clone()


def _segment_length(batch: int, A: Tensor) -> int:
    """Positions per segment so that one segment's (b, l, d, n) state stays within the device's bound."""
    budget = _CPU_SEGMENT_ELEMENTS if A.device.type == "cpu" else _GPU_SEGMENT_ELEMENTS
    return max(1, budget // (batch * A.numel()))


def _step_sizes(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """delta <- softplus(delta + delta_bias), each part optional (selective_scan_fn's convention)."""
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def _scan_tokens_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                       reverse: bool = False) -> Tensor:
    """The PyTorch selective scan in token layout: u, delta, z (b, L, d) and B, C (b, L, n) to y (b, L, d).

    ``reverse`` scans from the last position to the first, which equals scanning the flipped sequences and
    flipping y back, without copying five sequences twice. Without autograd it runs the segments last to
    first; _SelectiveSegment's hand-written backward knows one direction only, so with autograd the
    sequences are flipped.

    Runs segment by segment (see _segment_length), and does everything elementwise (softplus of delta, the
    D skip, the silu(z) gate) on the segment while it is in cache: on whole (b, L, d) tensors each of those
    was a trip to memory, together as costly as the scan. Segments are _SelectiveSegment calls when
    gradients are recorded and computed in reused buffers when not. Math in fp32 (fp64 for fp64 inputs)
    whatever the input dtype or autocast.
    """
    if _cpu_scan is not None and u.device.type == "cpu" and u.dtype == torch.float32:
        with torch.autocast(device_type="cpu", enabled=False):
            y = _cpu_scan(u, _step_sizes(delta.float(), delta_bias, delta_softplus), A.float(), B.float(), C.float(),
                          reverse)
            y = y + u * D.float() if D is not None else y
            return y * F.silu(z.float()) if z is not None else y
    if reverse and torch.is_grad_enabled():
        flipped = (x.flip(1) if x is not None else None for x in (u, delta, B, C, z))
        u, delta, B, C, z = flipped
        return _scan_tokens_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus).flip(1)
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        A = A.to(work)
        step = _segment_length(u.shape[0], A)
        workspace = None if torch.is_grad_enabled() else _Workspace(u, step, A)
        outputs, state = [], None
        starts = range(0, u.shape[1], step)
        for start in reversed(starts) if reverse else starts:
            part = slice(start, start + step)
            u_part = u[:, part].to(work)
            args = (_step_sizes(delta[:, part].to(work), delta_bias, delta_softplus), A, B[:, part].to(work),
                    C[:, part].to(work), u_part, state)
            if workspace is not None:
                y, state = workspace.segment(*args, part, reverse)
            else:
                y, state = _SelectiveSegment.apply(*args)
            if D is not None:
                y = y.addcmul_(u_part, D.to(work))
            if z is not None:
                y = y.mul_(F.silu(z[:, part].to(work)))
            outputs.append(y)
        y = workspace.y if workspace is not None else torch.cat(outputs, dim=1)
    return y.to(u.dtype)


def _check_scan_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor]) -> None:
    """Raise a ValueError naming the first argument whose shape or kind breaks selective_scan_fn's contract."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan needs u of shape (batch, d, L); got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"selective_scan needs a real A of shape (d={dim}, n); got {tuple(A.shape)} "
                         f"{A.dtype}")
    expected = {"delta": (delta, (batch, dim, length)), "B": (B, (batch, A.shape[1], length)),
                "C": (C, (batch, A.shape[1], length)), "D": (D, (dim,)), "z": (z, (batch, dim, length)),
                "delta_bias": (delta_bias, (dim,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan needs {name} of shape {shape} to match u {tuple(u.shape)} and "
                             f"A {tuple(A.shape)}; got {tuple(tensor.shape)}")
    if length == 0:
        raise ValueError("selective_scan needs a sequence of at least one position (L >= 1)")


def _resolve_backend(u: Tensor, backend: Backend) -> Literal["torch", "cuda"]:
    """Pick the kernel: CUDA when asked for or, with "auto", when the tensors are on a GPU and it imports."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "cuda" if u.is_cuda and cuda_scan_available() else "torch"
    if backend != "cuda":
        raise ValueError(f"selective_scan backend must be 'auto', 'torch' or 'cuda'; got {backend!r}")
    if not u.is_cuda:
        raise ValueError(f"selective_scan backend='cuda' needs CUDA tensors but u is on {u.device}; move the "
                         "inputs to the GPU or use backend='torch' (or 'auto')")
    if _cuda_selective_scan() is None:
        raise RuntimeError("selective_scan backend='cuda' needs mamba_ssm's compiled kernel, which does not "
                           "import here; install mamba-ssm for this CUDA/torch build or use backend='torch'")
    return "cuda"


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   backend: Backend = "auto") -> Tensor:
    """Selective scan S6 (Algorithm 2 of Gu & Dao 2023) with mamba_ssm ``selective_scan_fn`` semantics.

    u, delta, z: (b, d, L); A: (d, n) real; B, C: (b, n, L) input-dependent; D, delta_bias: (d,).
    delta <- softplus(delta + delta_bias) (each part optional), h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
    y_t = <C_t, h_t> + D u_t, times silu(z_t). Returns (b, d, L) in u's dtype; the PyTorch path computes in
    fp32 for half inputs. backend="auto" uses mamba_ssm's kernel for CUDA tensors when it imports.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if _resolve_backend(u, backend) == "torch":
        tokens = (x.transpose(1, 2) if x is not None else None for x in (u, delta, B, C, z))
        u_t, delta_t, B_t, C_t, z_t = tokens
        return _scan_tokens_torch(u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus).transpose(1, 2)
    delta, B, C = (x.to(u.dtype) for x in (delta, B, C))  # the kernel takes one dtype for all sequences
    z = z.to(u.dtype) if z is not None else None
    return _cuda_selective_scan()(u, delta, A.float(), B, C, D.float() if D is not None else None, z=z,
                                  delta_bias=delta_bias.float() if delta_bias is not None else None,
                                  delta_softplus=delta_softplus)


def _project(weight: Tensor, x: Tensor) -> Tensor:
    """weight (o, i) applied to x (b, i, L): a contiguous (b, o, L). torch.matmul would hand back a transposed
    view of a (b, L, o) product, whose every use by the kernel then costs a copy."""
    return torch.bmm(weight.to(x.dtype).expand(x.shape[0], -1, -1), x)


def _channel_mix(tokens: Tensor, in_weight: Tensor, directions: list[tuple[_DirectionalSSM, bool]],
                 out_weight: Tensor) -> Tensor:
    """(b, L, d_model) tokens -> (b, d_model, L): in_proj, the directions' scans summed and out_proj, all in
    mamba_simple's (b, d, L) layout.

    mamba_ssm's kernel reads (b, d, L) sequences with unit stride along L and has no reverse scan. Fed from the
    token layout, each direction copied five transposed sequences, and the reversed one flipped them first: on an
    H100 those copies were 35 % of the paper preset's GPU time against 20 % for the scan kernel itself. Here
    the projections write (b, d, L) directly and only x, z and y of the reversed direction are flipped: counted
    on the CPU around a stand-in kernel, one paper-preset pass at batch 1 moves 70 M elements in layout copies
    and flips instead of 168 M, in 3,020 ATen calls instead of 4,312.
    """
    x, z = (_project(weight, tokens.mT) for weight in in_weight.chunk(2))
    (first, first_reverse), *others = directions
    mixed = first.channels(x, z, first_reverse)
    for direction, reverse in others:
        mixed = mixed + direction.channels(x, z, reverse)
    return _project(out_weight, mixed)


def _check_block_args(d_model: int, d_state: int, d_conv: int, expand: float, dt_rank: int | str) -> int:
    """Validate the Mamba sizes and return the resolved dt_rank (ceil(d_model / 16) for "auto")."""
    for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Mamba needs {name} to be a positive int; got {value!r}")
    if expand <= 0 or int(expand * d_model) < 1:
        raise ValueError(f"Mamba needs expand > 0 with int(expand * d_model) >= 1; got expand={expand!r}")
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"Mamba needs dt_rank to be 'auto' or a positive int; got {dt_rank!r}")
    return dt_rank


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int) -> None:
    """mamba_simple's dt init: weight U(+-dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1].

    Starting with small, varied step sizes lets each channel remember over a different horizon.
    """
    bound = dt_rank ** -0.5
    with torch.no_grad():
        dt_proj.weight.uniform_(-bound, bound)
        log_dt = torch.rand(dt_proj.out_features) * (math.log(_DT_MAX) - math.log(_DT_MIN)) + math.log(_DT_MIN)
        dt = log_dt.exp().clamp(min=_DT_FLOOR)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool = False) -> Tensor:
    """Mamba's causal depthwise conv1d in token layout: y_t = bias + sum_k weight[:, 0, k] x_{t-K+1+k}.

    x (b, L, d), weight (d, 1, K) as nn.Conv1d stores it. K shifted multiply-adds on the tokens: oneDNN ran
    the equivalent (b, d, L) conv1d at 17 ms for (8, 36, 16384) on the 2-core Xeon, and the transposes and
    padding around it cost another 8 ms; the shifts take about a tenth of that and need no layout change.
    ``reverse`` gives the conv of the reversed sequence read back in order, y_t = bias + sum_k weight[:, 0, k]
    x_{t+K-1-k} (causal towards the start), with no flipped copies.
    """
    taps = weight[:, 0].t().to(x.dtype).contiguous()  # (K, d): a strided tap vector halves the speed
    size = taps.shape[0]
    y = x * taps[-1] if bias is None else torch.addcmul(bias.to(x.dtype), x, taps[-1])
    for k in range(size - 1):
        shift = size - 1 - k
        if shift < x.shape[1]:
            target, source = (y[:, :-shift], x[:, shift:]) if reverse else (y[:, shift:], x[:, :-shift])
            target.addcmul_(source, taps[k])
    return y


class _DirectionalSSM(nn.Module):
    """The per-direction half of a Mamba layer: causal depthwise conv, selection projections, A and D.

    Maps x, z of shape (b, L, d_inner) to the gated scan output (b, L, d_inner). Splitting it out of the
    projections lets BiMamba2D run two directions between one shared in_proj and out_proj.
    """

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        _init_dt_proj(self.dt_proj, dt_rank)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: Tensor, z: Tensor, reverse: bool = False) -> Tensor:
        """Causal conv + SiLU, input-dependent (delta, B, C), then the selective scan gated by silu(z).

        x, z (b, L, d_inner) in token layout; returns (b, L, d_inner). ``reverse`` runs the direction from the
        last token to the first, equal to flipping x and z, running forward and flipping the result back.
        """
        tokens = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias, reverse))
        dt_rank, d_state = self.dt_proj.in_features, self.A_log.shape[1]
        dt, B, C = self.x_proj(tokens).split([dt_rank, d_state, d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(self.A_log.float())
        return _scan_tokens_torch(tokens, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float(), True, reverse)

    def channels(self, x: Tensor, z: Tensor, reverse: bool = False) -> Tensor:
        """``forward`` for x, z in (b, d_inner, L) layout, the one mamba_ssm's kernel reads without copies.

        Every projection writes (b, ., L), so delta, B and C reach the kernel with unit stride along L; the
        kernel has no reverse, so ``reverse`` flips x and z and the output (mamba_simple's and Vision Mamba's way).
        """
        if reverse:
            x, z = x.flip(-1), z.flip(-1)
        size = self.conv1d.kernel_size[0]
        conv = F.conv1d(x, self.conv1d.weight, self.conv1d.bias, padding=size - 1, groups=self.conv1d.groups)
        u = F.silu(conv[..., : x.shape[-1]])
        dt_rank, d_state = self.dt_proj.in_features, self.A_log.shape[1]
        dt, B, C = _project(self.x_proj.weight, u).split([dt_rank, d_state, d_state], dim=1)
        delta = _project(self.dt_proj.weight, dt)
        A = -torch.exp(self.A_log.float())
        y = selective_scan(u, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float(), True, self.backend)
        return y.flip(-1) if reverse else y

    def uses_kernel(self, tensor: Tensor) -> bool:
        """Whether this direction runs mamba_ssm's kernel on ``tensor`` (and so wants the (b, d, L) layout)."""
        return _resolve_backend(tensor, self.backend) == "cuda"


class MambaBlock(nn.Module):
    """The Mamba layer of mamba_ssm's mamba_simple.py: (b, L, d_model) -> (b, L, d_model).

    in_proj -> depthwise causal conv1d -> SiLU -> x_proj -> dt_proj -> selective scan with A = -exp(A_log)
    (S4D-real init A_log = log(1..n)), D skip and silu(z) gate -> out_proj. backend picks the scan kernel
    (see selective_scan).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", backend: Backend = "auto") -> None:
        super().__init__()
        rank = _check_block_args(d_model, d_state, d_conv, expand, dt_rank)
        self.d_model, self.d_inner = d_model, int(expand * d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.ssm = _DirectionalSSM(self.d_inner, d_state, d_conv, rank, backend)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, hidden: Tensor) -> Tensor:
        """Apply the layer to a (b, L, d_model) sequence."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model or hidden.shape[1] == 0:
            raise ValueError(f"MambaBlock needs input of shape (batch, L >= 1, d_model={self.d_model}); got "
                             f"{tuple(hidden.shape)}")
        if self.ssm.uses_kernel(hidden):
            return _channel_mix(hidden, self.in_proj.weight, [(self.ssm, False)], self.out_proj.weight).mT
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        return self.out_proj(self.ssm(x, z))


class BiMamba2D(nn.Module):
    """Bidirectional Mamba on (b, c, h, w) feature maps, the Bi-Mamba layer of the AMGDM and MDPMM.

    Scan orders: the row-major raster forward and the same raster reversed. After these two scans every
    pixel has seen every other pixel (the forward scan carries all earlier pixels, the reversed one all later
    pixels), which is what the AMGDM needs to aggregate the global residual. Column neighbours are 1 row
    apart in the raster but w positions apart in the scan; their local context comes from the depthwise
    convs and the U-Net hierarchy around this layer, so a 4-direction cross-scan (which doubles the cost
    again) is not used.

    The two directions share in_proj and out_proj but each has its own conv, x_proj, dt_proj, A and D (as in
    Vision Mamba's bimamba): the projections hold most parameters and see the same tokens either way, while
    everything that makes a scan causal in one direction is per direction. The outputs are summed.
    Returns the layer output only; the caller adds the residual.

    With the PyTorch scan, the backward direction scans the same tokens last to first instead of flipping x, z
    and its output (three copies per call), and in_proj runs as its two halves, so x and z come out contiguous:
    the conv and the gate read the strided halves of one output about 1.5x slower, and at batch 8 on the first
    level that one (b, L, 2 d_inner) output was above glibc's 32 MiB mmap threshold, so every call page-faulted
    it afresh. With mamba_ssm's kernel the layer works in the kernel's (b, d, L) layout instead (_channel_mix).
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", backend: Backend = "auto") -> None:
        super().__init__()
        rank = _check_block_args(dim, d_state, d_conv, expand, dt_rank)
        self.dim, d_inner = dim, int(expand * dim)
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.forward_ssm = _DirectionalSSM(d_inner, d_state, d_conv, rank, backend)
        self.backward_ssm = _DirectionalSSM(d_inner, d_state, d_conv, rank, backend)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, image: Tensor) -> Tensor:
        """Apply the layer to a (b, dim, h, w) map; returns (b, dim, h, w)."""
        if image.dim() != 4 or image.shape[1] != self.dim or image.shape[2] * image.shape[3] == 0:
            raise ValueError(f"BiMamba2D needs a non-empty map of shape (batch, {self.dim}, h, w); got "
                             f"{tuple(image.shape)}")
        batch, _, height, width = image.shape
        tokens = self.norm(image.flatten(2).transpose(1, 2))
        if self.forward_ssm.uses_kernel(image):
            directions = [(self.forward_ssm, False), (self.backward_ssm, True)]
            return _channel_mix(tokens, self.in_proj.weight, directions, self.out_proj.weight).view(image.shape)
        x, z = (F.linear(tokens, weight) for weight in self.in_proj.weight.chunk(2))
        out = self.out_proj(self.forward_ssm(x, z) + self.backward_ssm(x, z, reverse=True))
        return out.transpose(1, 2).reshape(batch, self.dim, height, width)
