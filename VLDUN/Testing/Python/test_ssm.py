"""Tests for VLDUNLib.ssm: the chunked linear scan, selective_scan and the Mamba layers."""

from __future__ import annotations

import copy
import sys
import types
import math
from collections.abc import Callable
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from VLDUNLib import ssm
from VLDUNLib.ssm import BiMamba2D, MambaBlock, cuda_scan_available, selective_scan

def loop_linear_scan(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """h_t = a_t h_{t-1} + b_t, one Python step per position."""
    state = torch.zeros_like(b[..., 0, :]) if h0 is None else h0
    states = []
    for t in range(b.shape[-2]):
        state = a[..., t, :] * state + b[..., t, :]
        states.append(state)
    return torch.stack(states, dim=-2)


def loop_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                        z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                        delta_softplus: bool = False) -> Tensor:
    """mamba_ssm's selective_scan_ref semantics as a sequential loop over L."""
    dtype, u, delta = u.dtype, u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        step = delta[:, :, t, None]
        state = torch.exp(step * A) * state + step * B[:, None, :, t] * u[:, :, t, None]
        ys.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype)


def scan_inputs(b: int, d: int, n: int, length: int, *, with_d: bool = True, with_z: bool = True,
                with_bias: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random selective_scan inputs that require grad; optional ones are left out when not asked for."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    inputs = {"u": rand(b, d, length), "delta": rand(b, d, length).abs() * 0.5,
              "A": -torch.rand(d, n, generator=gen, dtype=dtype) * 3, "B": rand(b, n, length),
              "C": rand(b, n, length), "D": rand(d) if with_d else None, "z": rand(b, d, length) if with_z else None,
              "delta_bias": rand(d) * 0.5 if with_bias else None}
    return {k: v.requires_grad_() for k, v in inputs.items() if v is not None}


def assert_close_scaled(actual: Tensor, expected: Tensor, tol: float = 1e-5) -> None:
    """max |actual - expected| <= tol * (1 + max |expected|): 1e-5 relative to the tensor's scale."""
    bound = tol * (1 + expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def loop_linear_scan_reversed(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """h_t = a_t h_{t+1} + b_t from the last position down, the recurrence of the scan's gradients."""
    return loop_linear_scan(a.flip(1), b.flip(1), h0).flip(1)


# L = 1, 2, 37, 100, 257: chunks of floor(sqrt(L)) positions, with and without a sequential tail.
@pytest.mark.parametrize("shape", [(2, 1, 4), (1, 2, 1), (3, 37, 2), (2, 100, 6), (1, 257, 3)])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_scan_matches_loop(shape: tuple[int, int, int], with_h0: bool, reverse: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(*shape, generator=gen), torch.randn(*shape, generator=gen)
    h0 = torch.randn(shape[0], shape[2], generator=gen) if with_h0 else None
    a0, b0 = a.clone(), b.clone()
    out = torch.full_like(b, float("nan"))
    ssm._scan_into(out, a, b, h0, reverse)
    assert_close_scaled(out, (loop_linear_scan_reversed if reverse else loop_linear_scan)(a, b, h0))
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_chunked_scan_in_place_and_with_chunk_decay() -> None:
    """The backward scans its gradient in place (out is b); inference passes each chunk's decay in closed form."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 50, 3, generator=gen), torch.randn(2, 50, 3, generator=gen)
    h0 = torch.randn(2, 3, generator=gen)
    expected = loop_linear_scan_reversed(a, b, h0)
    in_place = b.clone()
    ssm._scan_into(in_place, a, in_place, h0, True)
    assert_close_scaled(in_place, expected)
    size = ssm._chunk_length(50)
    prod = a[:, : 50 // size * size].unflatten(1, (50 // size, size)).prod(2)
    decayed = torch.empty_like(b)
    ssm._scan_into(decayed, a, b, h0, False, prod)
    assert_close_scaled(decayed, loop_linear_scan(a, b, h0))


def test_segment_backward_gradcheck_float64() -> None:
    """The hand-written backward against finite differences, with an initial state and both outputs used."""
    gen = torch.Generator().manual_seed(4)
    b, length, d, n = 2, 11, 3, 4

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    delta = (torch.rand(b, length, d, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    A = (-torch.rand(d, n, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    inputs = (delta, A, rand(b, length, n), rand(b, length, n), rand(b, length, d), rand(b, n * d))
    assert torch.autograd.gradcheck(ssm._SelectiveSegment.apply, inputs)


def check_against_loop(inputs: dict[str, Tensor], softplus: bool) -> None:
    """Forward and gradients w.r.t. every input of selective_scan vs the loop reference, to 1e-5."""
    names = list(inputs)
    fast = selective_scan(**inputs, delta_softplus=softplus, backend="torch")
    slow = loop_selective_scan(**inputs, delta_softplus=softplus)
    assert fast.shape == slow.shape == inputs["u"].shape
    assert_close_scaled(fast, slow)
    grad_out = torch.randn_like(slow)
    grads_fast = torch.autograd.grad(fast, [inputs[k] for k in names], grad_out)
    grads_slow = torch.autograd.grad(slow, [inputs[k] for k in names], grad_out)
    for name, g_fast, g_slow in zip(names, grads_fast, grads_slow):
        assert g_fast.shape == inputs[name].shape, name
        assert_close_scaled(g_fast, g_slow)


@pytest.mark.parametrize("shape", [(2, 3, 4, 1), (1, 4, 3, 2), (2, 5, 4, 37), (2, 3, 8, 130), (1, 2, 2, 300)])
@pytest.mark.parametrize("options", [(True, True, True, True), (False, False, False, False),
                                     (True, False, True, False), (False, True, False, True)])
def test_selective_scan_matches_loop(shape: tuple[int, int, int, int], options: tuple[bool, ...]) -> None:
    with_d, with_z, with_bias, softplus = options
    inputs = scan_inputs(*shape, with_d=with_d, with_z=with_z, with_bias=with_bias)
    check_against_loop(inputs, softplus)


@pytest.mark.parametrize("segment_positions", [1, 7, 64])
def test_segmented_scan_matches_loop(monkeypatch: pytest.MonkeyPatch, segment_positions: int) -> None:
    b, d, n, length = 2, 3, 4, 150
    monkeypatch.setattr(ssm, "_CPU_SEGMENT_ELEMENTS", segment_positions * b * d * n)
    assert ssm._segment_length(b, torch.zeros(d, n)) == segment_positions
    check_against_loop(scan_inputs(b, d, n, length), softplus=True)


@pytest.mark.parametrize("segment_positions", [1, 7, 64, 1000])
def test_no_grad_scan_in_reused_buffers_matches_loop(monkeypatch: pytest.MonkeyPatch, segment_positions: int) -> None:
    """Inference takes the buffer-reusing path; it must give the unoptimised (autograd) path's numbers.

    Up to fp32 rounding: inference takes each chunk's decay as one exp of summed steps, not a product.
    """
    b, d, n, length = 2, 3, 4, 150
    monkeypatch.setattr(ssm, "_CPU_SEGMENT_ELEMENTS", segment_positions * b * d * n)
    inputs = scan_inputs(b, d, n, length)
    with torch.no_grad():
        fast = selective_scan(**inputs, delta_softplus=True, backend="torch")
    assert_close_scaled(fast, loop_selective_scan(**inputs, delta_softplus=True))
    torch.testing.assert_close(fast, selective_scan(**inputs, delta_softplus=True, backend="torch"),
                               rtol=1e-6, atol=1e-6)


def test_bimamba_inference_equals_training_mode_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssm, "_CPU_SEGMENT_ELEMENTS", 2**10)
    torch.manual_seed(0)
    layer = BiMamba2D(6, d_state=4, expand=1.5)
    image = torch.randn(2, 6, 9, 13)
    with torch.inference_mode():
        fast = layer(image)
    torch.testing.assert_close(fast, layer(image), rtol=0, atol=1e-5)


def flipped_direction(direction: ssm._DirectionalSSM, x: Tensor, z: Tensor) -> Tensor:
    """The unoptimised backward direction: flip the tokens, scan forward, flip the result back."""
    return direction(x.flip(1), z.flip(1)).flip(1)


@pytest.mark.parametrize("segment_positions", [1, 7, 64, 1000])
def test_reverse_direction_equals_flipped_sequences(monkeypatch: pytest.MonkeyPatch, segment_positions: int) -> None:
    """reverse=True scans last to first in place of three flipped copies: same values and gradients."""
    torch.manual_seed(0)
    direction = ssm._DirectionalSSM(5, 3, 4, 2, "torch")
    monkeypatch.setattr(ssm, "_CPU_SEGMENT_ELEMENTS", segment_positions * 2 * 5 * 3)
    x, z = torch.randn(2, 150, 5, requires_grad=True), torch.randn(2, 150, 5)
    with torch.no_grad():
        torch.testing.assert_close(direction(x, z, reverse=True), flipped_direction(direction, x, z),
                                   rtol=0, atol=1e-5)
    expected = torch.autograd.grad(flipped_direction(direction, x, z).square().sum(), [x, *direction.parameters()])
    got = torch.autograd.grad(direction(x, z, reverse=True).square().sum(), [x, *direction.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_bimamba2d_equals_its_unoptimised_formula() -> None:
    """One in_proj per half and the reversed scan change nothing beyond fp32 rounding (the issue's 1e-4)."""
    torch.manual_seed(0)
    layer = BiMamba2D(8, d_state=4, expand=1.5, backend="torch")
    image = torch.randn(2, 8, 16, 24)
    tokens = layer.norm(image.flatten(2).transpose(1, 2))
    x, z = layer.in_proj(tokens).chunk(2, dim=-1)
    mixed = layer.forward_ssm(x, z) + flipped_direction(layer.backward_ssm, x, z)
    expected = layer.out_proj(mixed).transpose(1, 2).reshape(image.shape)
    with torch.no_grad():
        torch.testing.assert_close(layer(image), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(layer(image), expected, rtol=0, atol=1e-4)


def test_segmented_scan_keeps_no_full_length_state(monkeypatch: pytest.MonkeyPatch) -> None:
    b, d, n, length = 1, 4, 4, 2048
    monkeypatch.setattr(ssm, "_CPU_SEGMENT_ELEMENTS", 64 * b * d * n)
    saved: list[int] = []

    def record(tensor: Tensor) -> Tensor:
        saved.append(tensor.numel())
        return tensor

    inputs = scan_inputs(b, d, n, length)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        selective_scan(**inputs, delta_softplus=True, backend="torch")
    assert saved and max(saved) <= b * d * length < b * d * n * length


def test_selective_scan_gradcheck_float64() -> None:
    inputs = scan_inputs(1, 2, 3, 13, dtype=torch.float64)
    names = list(inputs)

    def scan(*tensors: Tensor) -> Tensor:
        return selective_scan(**dict(zip(names, tensors)), delta_softplus=True, backend="torch")

    assert torch.autograd.gradcheck(scan, tuple(inputs.values()))


def test_large_steps_stay_finite() -> None:
    inputs = scan_inputs(2, 4, 16, 200)
    with torch.no_grad():
        inputs["delta"].uniform_(0, 50)
        inputs["A"].copy_(-torch.linspace(0.5, 16, 16).repeat(4, 1))
    y = selective_scan(**inputs, backend="torch")
    grads = torch.autograd.grad(y.sum(), list(inputs.values()))
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_scaled(y, loop_selective_scan(**inputs), 1e-4)


def test_selective_scan_leaves_inputs_unchanged() -> None:
    inputs = scan_inputs(2, 3, 4, 20)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    selective_scan(**inputs, delta_softplus=True, backend="torch")
    assert all(torch.equal(inputs[k], before[k]) for k in inputs)


def test_half_precision_inputs_use_fp32_math() -> None:
    inputs = {k: v.detach().bfloat16() for k, v in scan_inputs(2, 4, 4, 300).items()}
    y = selective_scan(**inputs, delta_softplus=True, backend="torch")
    expected = loop_selective_scan(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.bfloat16().float(), rtol=2 ** -7, atol=1e-3)


def test_autocast_does_not_lower_scan_precision() -> None:
    inputs = {k: v.detach() for k, v in scan_inputs(2, 8, 4, 64).items()}
    plain = selective_scan(**inputs, delta_softplus=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = selective_scan(**inputs, delta_softplus=True, backend="torch")
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=1e-6, atol=1e-6)


def test_cuda_backend_on_cpu_tensors_raises() -> None:
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        selective_scan(**scan_inputs(1, 2, 3, 5), backend="cuda")


def test_unknown_backend_raises() -> None:
    with pytest.raises(ValueError, match="backend must be"):
        selective_scan(**scan_inputs(1, 2, 3, 5), backend="triton")  # type: ignore[arg-type]


def test_auto_backend_keeps_cpu_tensors_off_the_cuda_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def kernel_must_not_run(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError("the CUDA kernel was called for CPU tensors")

    monkeypatch.setattr(ssm, "_cuda_selective_scan", lambda: kernel_must_not_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    inputs = scan_inputs(1, 2, 3, 9)
    assert cuda_scan_available()
    torch.testing.assert_close(selective_scan(**inputs), loop_selective_scan(**inputs))


def fake_mamba_ssm(monkeypatch: pytest.MonkeyPatch, kernel: object) -> Callable[..., Tensor]:
    """Install a stand-in mamba_ssm whose interface module has `kernel` as its `selective_scan_cuda`."""
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_cuda = kernel  # type: ignore[attr-defined]
    interface.selective_scan_fn = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    ops = types.ModuleType("mamba_ssm.ops")
    ops.selective_scan_interface = interface  # type: ignore[attr-defined]
    for name, module in (("mamba_ssm", types.ModuleType("mamba_ssm")), ("mamba_ssm.ops", ops),
                         ("mamba_ssm.ops.selective_scan_interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    return interface.selective_scan_fn  # type: ignore[attr-defined]


@pytest.mark.parametrize("compiled", [True, False])
def test_mamba_ssm_without_its_compiled_kernel_is_not_used(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """mamba-ssm 2.3+ installed plainly imports with selective_scan_cuda None; using it would raise per call."""
    fn = fake_mamba_ssm(monkeypatch, object() if compiled else None)
    ssm._cuda_selective_scan.cache_clear()
    try:
        assert ssm._cuda_selective_scan() is (fn if compiled else None)
        advice = ssm.missing_cuda_scan(torch.device("cuda"))
        assert (advice is None) == compiled
        assert compiled or ssm.MAMBA_INSTALL in advice
        assert ssm.missing_cuda_scan(torch.device("cpu")) is None
    finally:
        ssm._cuda_selective_scan.cache_clear()


@pytest.mark.parametrize("name, shape", [("u", (2, 3)), ("delta", (1, 2, 4)), ("A", (3, 3)), ("B", (1, 4, 5)),
                                         ("C", (1, 2, 4)), ("D", (3,)), ("z", (1, 2, 6)), ("delta_bias", (1,))])
def test_selective_scan_rejects_bad_shapes(name: str, shape: tuple[int, ...]) -> None:
    inputs = {k: v.detach() for k, v in scan_inputs(1, 2, 3, 5).items()}
    inputs[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=f"needs (a real )?{name}"):
        selective_scan(**inputs)


@pytest.mark.parametrize("kind", ["bimamba2d", "mamba_block"])
def test_kernel_layout_computes_what_the_token_layout_does(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The (b, d, L) path that feeds mamba_ssm's kernel, run here on the PyTorch scan: same values and gradients."""
    torch.manual_seed(0)
    layer = BiMamba2D(8, d_state=4, expand=1.5, backend="torch") if kind == "bimamba2d" else MambaBlock(8, d_state=4)
    shape = (2, 8, 9, 13) if kind == "bimamba2d" else (2, 117, 8)
    inputs = torch.randn(shape, requires_grad=True)
    results = []
    for kernel_layout in (False, True):
        monkeypatch.setattr(ssm._DirectionalSSM, "uses_kernel", lambda self, tensor: kernel_layout)
        out = layer(inputs)
        results.append((out, torch.autograd.grad(out.square().sum(), [inputs, *layer.parameters()])))
    (tokens, token_grads), (channels, channel_grads) = results
    torch.testing.assert_close(channels, tokens, rtol=0, atol=1e-5)
    for got, expected in zip(channel_grads, token_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_kernel_gets_every_sequence_without_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """mamba_ssm copies any sequence whose stride along L is not 1; BiMamba2D must hand it none such."""
    strides = []

    def kernel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, **kwargs) -> Tensor:
        strides.extend(x.stride(-1) for x in (u, delta, B, C, z))
        return selective_scan(u, delta, A, B, C, D, z, **kwargs, backend="torch")

    monkeypatch.setattr(ssm, "_cuda_selective_scan", lambda: kernel)
    monkeypatch.setattr(ssm, "_resolve_backend", lambda u, backend: "torch" if backend == "torch" else "cuda")
    torch.manual_seed(0)
    layer = BiMamba2D(8, d_state=4, expand=1.5)
    image = torch.randn(2, 8, 9, 13)
    with torch.no_grad():
        out = layer(image)
    assert strides == [1] * 10
    monkeypatch.setattr(ssm, "_resolve_backend", lambda u, backend: "torch")
    with torch.no_grad():
        torch.testing.assert_close(out, layer(image), rtol=0, atol=1e-5)


@pytest.mark.skipif(not cuda_scan_available(), reason="needs a GPU and an importable mamba_ssm")
def test_cuda_kernel_matches_torch_scan() -> None:
    inputs = {k: v.detach().cuda().requires_grad_() for k, v in scan_inputs(2, 16, 8, 1000).items()}
    results = []
    for backend in ("cuda", "torch"):
        y = selective_scan(**inputs, delta_softplus=True, backend=backend)
        results.append((y, torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y))))
    (y_cuda, g_cuda), (y_torch, g_torch) = results
    torch.testing.assert_close(y_cuda, y_torch, rtol=1e-3, atol=1e-4)
    for a, b in zip(g_cuda, g_torch):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * (1 + b.abs().max().item()))


@pytest.mark.skipif(not cuda_scan_available(), reason="needs a GPU and an importable mamba_ssm")
def test_bimamba2d_on_the_cuda_kernel_matches_the_torch_scan() -> None:
    """Both directions, the reversed one included (the kernel has no reverse: its sequences are flipped)."""
    torch.manual_seed(0)
    layer = BiMamba2D(16, d_state=8, backend="torch").cuda()
    kernel = copy.deepcopy(layer)
    kernel.forward_ssm.backend = kernel.backward_ssm.backend = "cuda"
    image = torch.randn(2, 16, 24, 40, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(kernel(image), layer(image), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("length", [1, 3, 4, 50])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_depthwise_conv_equals_padded_conv1d(length: int, with_bias: bool) -> None:
    """The token-layout shifts replace mamba_simple's padded nn.Conv1d: same values and gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, length, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), weight, bias, groups=5).transpose(1, 2)
    torch.testing.assert_close(ssm.causal_depthwise_conv(x, weight, bias), expected, rtol=0, atol=1e-12)
    flipped = ssm.causal_depthwise_conv(x.flip(1), weight, bias).flip(1)
    torch.testing.assert_close(ssm.causal_depthwise_conv(x, weight, bias, reverse=True), flipped, rtol=0, atol=1e-12)
    inputs = (x, weight, bias) if with_bias else (x, weight)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda *args: ssm.causal_depthwise_conv(*args[:2], *args[2:] or (None,), reverse=reverse), inputs)


def test_mamba_block_init_follows_mamba_simple() -> None:
    torch.manual_seed(0)
    block = MambaBlock(40, d_state=6)
    assert block.d_inner == 80 and block.ssm.dt_proj.in_features == math.ceil(40 / 16)
    torch.testing.assert_close(-torch.exp(block.ssm.A_log), -torch.arange(1.0, 7.0).repeat(80, 1))
    dt = F.softplus(block.ssm.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001 and dt.max() / dt.min() > 10
    assert torch.equal(block.ssm.D, torch.ones(80))


def test_mamba_block_shape_gradients_and_causality() -> None:
    torch.manual_seed(0)
    block = MambaBlock(8, d_state=4, backend="torch")
    x = torch.randn(2, 63, 8, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    with torch.no_grad():
        bumped = x.detach().clone()
        bumped[:, 40] += 1.0
        diff = (block(bumped) - block(x)).abs().amax(dim=(0, 2))
    assert diff[:40].max() == 0 and diff[40:].min() > 0


def test_mamba_block_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="d_model=8"):
        MambaBlock(8)(torch.randn(1, 5, 6))


def test_mamba_block_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="dt_rank"):
        MambaBlock(8, dt_rank=0)


@pytest.mark.parametrize("batch, height, width", [(1, 7, 9), (2, 5, 4)])
def test_bimamba2d_shape_and_gradients(batch: int, height: int, width: int) -> None:
    torch.manual_seed(0)
    layer = BiMamba2D(6, d_state=4, backend="torch")
    x = torch.randn(batch, 6, height, width, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_bimamba2d_single_pixel() -> None:
    x = torch.randn(3, 6, 1, 1)
    assert BiMamba2D(6, d_state=4)(x).shape == x.shape


def test_bimamba2d_is_bidirectional() -> None:
    torch.manual_seed(0)
    layer = BiMamba2D(6, d_state=4, backend="torch")
    with torch.no_grad():
        for direction in (layer.forward_ssm, layer.backward_ssm):  # long memory: influence far above rounding
            direction.A_log.fill_(math.log(0.01))
            direction.dt_proj.bias.zero_()
        x = torch.randn(1, 6, 7, 9)
        bump = torch.randn(6)  # not constant over channels, which the LayerNorm would remove
        base = layer(x)
        last, first = x.clone(), x.clone()
        last[0, :, -1, -1] += bump
        first[0, :, 0, 0] += bump
        assert (layer(last) - base)[..., 0, 0].abs().max() > 1e-5
        assert (layer(first) - base)[..., -1, -1].abs().max() > 1e-5


def test_bimamba2d_reversed_raster_swaps_directions() -> None:
    torch.manual_seed(0)
    layer = BiMamba2D(6, d_state=4, backend="torch")
    swapped = copy.deepcopy(layer)
    swapped.forward_ssm, swapped.backward_ssm = layer.backward_ssm, layer.forward_ssm
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x.flip(2, 3)), layer(x).flip(2, 3), rtol=1e-5, atol=1e-6)


def test_bimamba2d_runs_under_autocast() -> None:
    torch.manual_seed(0)
    layer = BiMamba2D(8, d_state=4, backend="torch")
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        plain = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = layer(x)
    assert cast.dtype == torch.bfloat16 and torch.isfinite(cast).all()
    torch.testing.assert_close(cast.float(), plain, rtol=0.05, atol=0.05 * plain.abs().max().item())


def test_bimamba2d_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"\(batch, 6, h, w\)"):
        BiMamba2D(6)(torch.randn(1, 5, 4, 4))
