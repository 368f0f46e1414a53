"""`vldun benchmark --quick`: the whole path (both presets' code, a peer imported from a checkout, volumes
run in child processes) on tiny sizes, and the errors a user can hit before anything is measured."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from vldun_lab.benchmark import (
    GreyAsPeerInput,
    batch_sweep,
    benchmark_command,
    graph_replay,
    graph_rows,
    halving_on_oom,
    load_peer,
    parse_peer,
    peak_rss_mb,
    ratios,
    settings_from_args,
)
from VLDUNLib.cli import build_parser

FAKE_PEER = '''
from torch import nn


class PromptIR(nn.Module):
    """Stands in for PromptIR: RGB in, RGB out, the constructor argument the benchmark passes."""

    def __init__(self, decoder=False):
        super().__init__()
        assert decoder, "the benchmark builds PromptIR(decoder=True)"
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == 3, "PromptIR takes RGB images"
        return x + self.conv(x)
'''


@pytest.fixture
def peer_checkout(tmp_path: Path) -> Path:
    """A folder laid out like a PromptIR checkout (net/model.py) holding a tiny stand-in."""
    root = tmp_path / "PromptIR"
    (root / "net").mkdir(parents=True)
    (root / "net" / "model.py").write_text(FAKE_PEER)
    return root


def bench_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["benchmark", "--quick", "--presets", "compact", "--threads", "1", *extra])


def test_quick_run_writes_every_figure_and_the_peer_ratio(tmp_path: Path, peer_checkout: Path) -> None:
    out = tmp_path / "bench.json"
    benchmark_command(bench_args("--device", "cpu", "--json", str(out), "--peer", f"promptir={peer_checkout}"))
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] == 1 and report["machine"]["torch"] == torch.__version__
    assert report["machine"]["cpu"]
    size = report["settings"]["slice_size"]
    assert size == 64
    for name in ("compact", "promptir"):
        model = report["models"][name]
        assert model["params"] > 0 and model[f"flops_{size}"] > 0
        b1, best = model[f"cpu_ms_per_slice_{size}_b1"], model[f"cpu_ms_per_slice_{size}_best"]
        assert 0 < best <= b1
        assert model["cpu_best_batch"] in (1, 2)
        volume = model["volumes"]["cpu"]["64x64x4"]
        assert volume["volume_seconds"] > 0 and volume["runs"] == 1
        assert volume["peak_rss_mb"] >= volume["import_rss_mb"] > 50
    assert report["models"]["compact"]["volumes"]["cpu"]["64x64x4"]["outputs"] == [
        "detection.json", "restored.nii.gz", "segmentation.nii.gz"
    ]
    peer_volume = report["models"]["promptir"]["volumes"]["cpu"]["64x64x4"]
    assert peer_volume["outputs"] == ["restored.nii.gz"]
    # The child's peak is its own: not the parent's (which holds every model and open_clip), and a peer's
    # child does not load VLDUN's network modules.
    assert peer_volume["peak_rss_mb"] < peak_rss_mb() - 100
    ours, peer = report["models"]["compact"], report["models"]["promptir"]
    assert peer_volume["import_rss_mb"] < ours["volumes"]["cpu"]["64x64x4"]["import_rss_mb"] - 50
    ratio = report["ratio_vs_peer"]["promptir"]["compact"]
    assert ratio["params"] == pytest.approx(ours["params"] / peer["params"], rel=1e-3)
    key = f"cpu_ms_per_slice_{size}_b1"
    assert ratio[key] == pytest.approx(ours[key] / peer[key], rel=1e-3)
    assert "volumes/cpu/64x64x4/volume_seconds" in ratio


def test_full_settings_measure_at_256_with_both_volume_sizes() -> None:
    settings = settings_from_args(build_parser().parse_args(["benchmark", "--device", "cpu"]))
    assert settings.slice_size == 256 and settings.presets == ("compact", "paper")
    assert settings.volumes == ((256, 256, 100), (512, 512, 300))
    assert settings.batch_sizes["cpu"] == (1, 2, 4, 8, 16) and settings.repeats > 1


def test_batch_sizes_always_include_batch_one() -> None:
    settings = settings_from_args(bench_args("--batch-sizes", "8,4", "--volumes", "none"))
    assert settings.batch_sizes["cpu"] == (1, 4, 8) and settings.volumes == ()


def test_peer_is_imported_from_its_checkout_and_sees_rgb(peer_checkout: Path) -> None:
    name, root = parse_peer(f"promptir={peer_checkout}")
    model = load_peer(name, root)
    assert isinstance(model, GreyAsPeerInput) and model.channels == 3
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    expected = model.peer(x.repeat(1, 3, 1, 1)).mean(1, keepdim=True)
    assert torch.allclose(y, expected)
    assert str(root) not in sys.path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("promptir", "expected NAME=PATH"),
        ("restormer=/tmp", "unknown peer"),
        ("promptir={missing}", "net/model.py does not exist"),
    ],
)
def test_bad_peer_spec_is_a_clear_error(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from_args(bench_args("--peer", spec.format(missing=tmp_path / "nowhere")))


def test_peer_with_a_missing_dependency_names_it(tmp_path: Path) -> None:
    root = tmp_path / "peer"
    (root / "net").mkdir(parents=True)
    (root / "net" / "model.py").write_text("import einops_not_installed_here\n")
    with pytest.raises(ValueError, match="pip install einops_not_installed_here"):
        load_peer(*parse_peer(f"promptir={root}"))


@pytest.mark.parametrize(
    "option",
    [["--volumes", "256x256"], ["--batch-sizes", "0,2"], ["--repeats", "0"], ["--presets", ""], ["--presets", "huge"]],
)
def test_bad_sizes_are_clear_errors(option: list[str]) -> None:
    with pytest.raises(ValueError, match=r"--|preset"):
        settings_from_args(bench_args(*option))


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    tried: list[int] = []

    def run(batch: int) -> str:
        tried.append(batch)
        if batch > 4:
            raise torch.cuda.OutOfMemoryError("fake")
        return f"ran {batch}"

    assert halving_on_oom(run, 16) == (4, "ran 4")
    assert tried == [16, 8, 4]


def test_sweep_stops_at_the_first_batch_that_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_args(bench_args("--volumes", "none"))

    def forward(x: torch.Tensor) -> None:
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("fake")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    sweep = batch_sweep(forward, torch.zeros(1, 1, 8, 8), (1, 2, 4, 8), settings, bf16=False)
    assert sorted(sweep) == [1, 2]


def test_sweep_stops_once_throughput_has_peaked() -> None:
    settings = settings_from_args(bench_args("--volumes", "none"))

    def forward(x: torch.Tensor) -> None:
        time.sleep(0.002 * len(x) ** 2)

    sweep = batch_sweep(forward, torch.zeros(1, 1, 8, 8), (1, 2, 4, 8), settings, bf16=False)
    assert sorted(sweep) == [1, 2]
    assert sweep[2][0] > sweep[1][0]


def test_ratios_compare_common_figures_only() -> None:
    ours = {"params": 10, "flops_64": 50, "cpu_ms_spread_64_b1": 3.0, "cpu_best_batch": 4,
            "volumes": {"cpu": {"4x4x4": {"volume_seconds": 2.0, "batch_size": 4}}}, "prior_params": 7}
    peer = {"params": 40, "flops_64": 100, "cpu_ms_spread_64_b1": 1.0, "cpu_best_batch": 2,
            "volumes": {"cpu": {"4x4x4": {"volume_seconds": 4.0, "batch_size": 2}}}}
    assert ratios(ours, peer) == {"params": 0.25, "flops_64": 0.5, "volumes/cpu/4x4x4/volume_seconds": 0.5}


def test_graph_replay_figures_are_tabled_and_compared() -> None:
    models = {"paper": {"cuda_bf16_graph_ms_per_slice_256_b1": 7.146, "cuda_bf16_graph_ms_spread_256_b1": 0.146},
              "promptir": {"cuda_bf16_graph_error_256_b1": "operation not permitted when stream is capturing"}}
    assert graph_rows(models, 256) == [["paper", "7.15 ± 0.15"],
                                       ["promptir", "not capturable: operation not permitted when stream is capturing"]]
    peer = {"cuda_bf16_graph_ms_per_slice_256_b1": 14.292}
    assert ratios(models["paper"], peer) == {"cuda_bf16_graph_ms_per_slice_256_b1": 0.5}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_recomputes_the_eager_bf16_forward() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(4, 1, 1)).cuda()
    x = torch.rand(1, 1, 32, 32, device="cuda")
    outputs: list[torch.Tensor] = []
    replay = graph_replay(lambda batch: outputs.append(model(batch)), x)
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        eager = model(x)
    x.copy_(torch.rand_like(x))
    replay()
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(outputs[-1], model(x))
    assert not torch.equal(outputs[-1], eager)
