"""Parameters, FLOPs and CPU latency of a preset, measured the same way for every model.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add of
matrix products, convolutions and attention; element-wise work (including the selective scan's
recurrence) is not counted, for our model and for peers alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from VLDUNLib.config import make_config
from VLDUNLib.network import VLDUN


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of one call of `fn`."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def median_ms(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, float]:
    """Median and spread (max - min) in milliseconds of `repeats` timed calls after `warmup` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), max(times) - min(times)


def parameter_count(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def complexity(preset: str, size: int = 256, repeats: int = 3, threads: int | None = None) -> dict[str, object]:
    """The figures of `vldun complexity` for one preset (random weights: cost does not depend on them)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = VLDUN(make_config(preset)).eval()
    x = torch.rand(1, 1, size, size)
    prior = model.compute_prior(x)
    network_flops = count_flops(lambda: model(x, prior))
    prior_flops = count_flops(lambda: model.compute_prior(x))
    ms, spread = median_ms(lambda: model(x, prior), repeats=repeats)
    return {
        "preset": preset,
        "params": model.unfolding_parameters(),
        "prior_params": parameter_count(model.prior),
        "flops_256": network_flops,
        "prior_flops": prior_flops,
        "flops_unit": "FLOP",
        "cpu_ms_per_slice_256": round(ms, 1),
        "cpu_ms_spread": round(spread, 1),
        "threads": torch.get_num_threads(),
        "note": (
            "params and flops_256: unfolding network + heads per slice with the CLIP prior computed once per "
            "volume (prior_params/prior_flops give the prior's own cost per call)"
        ),
    }
