"""The selective scan compiled for CPU training (`csrc/selective_scan_cpu.cpp`), plugged into `VLDUNLib.ssm`.

The product's PyTorch scan materialises (b, l, n, d) coefficients and states and is bound by memory traffic: it
took over half of a CPU training step. The compiled kernel keeps each position's (n, d) state in cache and
computes the same function (the tests hold it to the PyTorch scan, values and gradients). It is built with
torch's C++ extension loader on first use (about 45 s, then cached per machine); where no compiler is found,
training keeps the PyTorch scan and says so in the run's sessions.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from VLDUNLib import ssm

CHUNK = 64
"""Positions whose states the backward recomputes at once: (64, n, d) states and decays stay in L2."""

_SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"


def _machine_tag() -> str:
    """A tag of this CPU's instruction set: the build uses -march=native, so each kind of CPU gets its own."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


@functools.cache
def extension() -> ModuleType:
    """The compiled kernel (built on first call; raises what the compiler or loader raised)."""
    import ninja  # torch's loader runs `ninja` from PATH, which a venv's console script does not extend
    from torch.utils.cpp_extension import load

    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    return load(f"vldun_scan_cpu_{_machine_tag()}", [str(_SOURCE)],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"], verbose=False)


class _FusedScan(torch.autograd.Function):
    """y = selective scan of (u, delta, A, B, C), token layout; the backward recomputes states chunk by chunk."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, reverse: bool) -> Tensor:
        inputs = [x.contiguous() for x in (u, delta, A.t(), B, C)]
        y, starts = extension().forward(*inputs, reverse, CHUNK)
        ctx.save_for_backward(*inputs, starts)
        ctx.reverse = reverse
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        *inputs, starts = ctx.saved_tensors
        du, ddelta, dAt, dB, dC = extension().backward(*inputs, grad_y.contiguous(), starts, ctx.reverse, CHUNK)
        return du, ddelta, dAt.t(), dB, dC, None


def fused_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, reverse: bool) -> Tensor:
    """``ssm.CpuScan``: u, delta (after softplus), y (b, L, d); B, C (b, L, n); A (d, n); all fp32 on the CPU."""
    return _FusedScan.apply(u, delta, A, B, C, reverse)


def install() -> str:
    """Route the model's CPU scans through the compiled kernel; returns which scan training runs with."""
    try:
        extension()
    except Exception as error:  # noqa: BLE001 - any build failure leaves the (slower) PyTorch scan
        ssm.use_cpu_scan(None)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"PyTorch (the compiled kernel did not build: {first})"
    ssm.use_cpu_scan(fused_scan)
    return "compiled CPU kernel"
