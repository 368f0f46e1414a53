"""The compiled CPU scan computes what the product's PyTorch scan computes, values and gradients."""

from __future__ import annotations

import pytest
import torch
from VLDUNLib import ssm
from VLDUNLib.ssm import BiMamba2D, _scan_tokens_torch

from vldun_lab import cpu_scan
from vldun_lab.train import provenance_table, scan_backend


@pytest.fixture(scope="module")
def kernel():
    if cpu_scan.install() != "compiled CPU kernel":
        pytest.skip("no C++ compiler here: training keeps the PyTorch scan")
    ssm.use_cpu_scan(None)
    return cpu_scan.fused_scan


def inputs(length: int, seed: int = 0, batch: int = 2, dim: int = 13, state: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, dim, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, dim, generator=g) - 2)
    A = -(torch.rand(dim, state, generator=g) * 6 + 0.3)
    B, C = (torch.randn(batch, length, state, generator=g) for _ in range(2))
    return [x.requires_grad_() for x in (u, delta, A, B, C)]


@pytest.mark.parametrize("length", [1, 5, cpu_scan.CHUNK, cpu_scan.CHUNK + 1, 3 * cpu_scan.CHUNK - 7])
@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_matches_pytorch_scan(kernel, length, reverse):
    ours, theirs = inputs(length), inputs(length)
    grad = torch.randn(2, length, 13, generator=torch.Generator().manual_seed(1))
    y = kernel(*ours, reverse)
    reference = _scan_tokens_torch(*theirs, None, None, None, False, reverse)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    y.backward(grad), reference.backward(grad)
    for name, a, b in zip(("u", "delta", "A", "B", "C"), ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_kernel_runs_without_autograd(kernel):
    with torch.no_grad():
        x = [t.detach() for t in inputs(100)]
        torch.testing.assert_close(kernel(*x, False), _scan_tokens_torch(*x, None, None, None, False), rtol=1e-5,
                                   atol=1e-5)


def test_layer_through_the_hook_matches_the_pytorch_layer(kernel):
    torch.manual_seed(0)
    layer = BiMamba2D(8, d_state=4, expand=1.5)
    image = torch.randn(2, 8, 9, 11)
    expected = layer(image)
    expected.square().mean().backward()
    reference = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    ssm.use_cpu_scan(kernel)
    got = layer(image)
    got.square().mean().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_float64_keeps_the_pytorch_scan(kernel):
    ssm.use_cpu_scan(lambda *args: pytest.fail("the compiled scan is fp32 only"))
    x = [t.detach().double() for t in inputs(10)]
    assert _scan_tokens_torch(*x, None, None, None, False).dtype == torch.float64


def test_failed_build_leaves_the_pytorch_scan_and_says_why(monkeypatch):
    def broken():
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(cpu_scan, "extension", broken)
    assert scan_backend(torch.device("cpu")) == "PyTorch (the compiled kernel did not build: Ninja is required to load C++ extensions)"
    assert ssm._cpu_scan is None


def test_model_card_names_each_sessions_scan():
    sessions = [{"started": "2026-12-06T06:00:00Z", "machine": "cpu", "code": "abc", "scan": "compiled CPU kernel",
                 "from": ["joint", 0], "to": ["joint", 10], "seconds": 60.0},
                {"started": "2026-12-05T06:00:00Z", "machine": "cpu", "code": "abd", "from": ["prior", 0],
                 "to": ["prior", 5], "seconds": 60.0}]
    table = provenance_table("recipes/x.yaml", sessions)
    assert "| cpu | compiled CPU kernel | abc |" in table and "| cpu | PyTorch | abd |" in table
