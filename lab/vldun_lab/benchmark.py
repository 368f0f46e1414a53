"""`vldun benchmark`: speed and memory of each preset and of peers, measured the same way for every model.

Per model: parameters, FLOPs of one slice (the counter of `complexity`, for peers too), per-slice
latency at batch 1 and at the best batch size, on the CPU and, when there is one, the GPU (also under
bf16 autocast); then the end-to-end time of whole volumes (file read -> prior -> network -> restored and
label volumes written), each run in a child process so that its peak RSS is the run's own and not the
parent's, which holds every model and input.

Inputs come from a real scan, the MNI152 T1 template shipped with nilearn, resampled to each size.
Timings are the median and spread (max - min) of repeated runs after untimed warm-up runs.
A peer (e.g. PromptIR) is imported from a checkout the user supplies, with random weights like ours
(speed does not depend on them); it takes RGB images, so the grey slice is repeated to 3 channels and
its output averaged back to one channel: every model sees the same slices.

The modules that pull in VLDUN's network (and open_clip) are imported inside the functions that need
them: a peer's child process then loads only what a peer run needs, so its peak RSS is its own too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn
from VLDUNLib.config import make_config
from VLDUNLib.intensity import denormalize, fit_window, normalize, to_unit_range

T = TypeVar("T")

MNI_T1 = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
"""The MNI152 T1 template inside the nilearn package (a real, openly licensed brain MRI)."""

Size3 = tuple[int, int, int]
"""A volume size (W, H, S): S slices of W x H."""

PEAKED = 1.1
"""A batch size this much slower per slice than the best one so far ends the sweep: throughput has
peaked, and larger batches would only cost time (PromptIR at 256x256 takes seconds per slice on a CPU)."""


@dataclass(frozen=True)
class PeerKind:
    """How to build a peer from its checkout's `net/model.py`."""

    class_name: str
    kwargs: dict[str, Any]
    channels: int
    """Input channels the peer expects; grey slices are repeated to this many."""
    source: str


PEERS: dict[str, PeerKind] = {
    "promptir": PeerKind("PromptIR", {"decoder": True}, 3, "https://github.com/va1shn9v/PromptIR"),
}


@dataclass(frozen=True)
class Settings:
    presets: tuple[str, ...]
    peers: tuple[tuple[str, Path], ...]
    slice_size: int
    batch_sizes: dict[str, tuple[int, ...]]
    """Batch sizes tried per device type."""
    repeats: int
    warmup: int
    volumes: tuple[Size3, ...]
    volume_repeats: int
    threads: int
    devices: tuple[str, ...]


@dataclass
class Subject:
    """One benchmarked model: its module, its per-slice forward and how a child process runs a volume with it."""

    name: str
    module: nn.Module
    prepare: Callable[[torch.Tensor], Callable[[torch.Tensor], object]]
    """Given a batch-1 sample on the target device, the forward to time, (B, 1, H, W) in [0, 1] -> output
    (ours computes the volume's prior here, once, as `VolumePredictor` does)."""
    child_args: list[str]
    """What `python -m vldun_lab.benchmark` needs besides the volume to run this model."""
    facts: dict[str, Any] = field(default_factory=dict)
    prior: Callable[[torch.Tensor], object] | None = None
    """The once-per-volume prior, whose FLOPs are counted apart from the per-slice network's."""


# ---------------------------------------------------------------- settings


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} {text!r}: give comma-separated whole numbers, e.g. 1,2,4,8.") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} {text!r}: every value must be 1 or more.")
    return values


def parse_volume_size(text: str) -> Size3:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--volumes: {text!r} is not WxHxS (e.g. 256x256x100); use positive whole numbers.")
    w, h, s = (int(p) for p in parts)
    return w, h, s


def parse_peer(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` -> (name, checkout root), checked before anything is measured."""
    if "=" not in spec:
        raise ValueError(f"--peer {spec!r}: expected NAME=PATH, e.g. promptir=../PromptIR.")
    name, root = (part.strip() for part in spec.split("=", 1))
    name = name.lower()
    if name not in PEERS:
        raise ValueError(f"--peer {spec!r}: unknown peer {name!r}; known peers: {sorted(PEERS)}.")
    model_file = Path(root).expanduser() / "net" / "model.py"
    if not model_file.is_file():
        raise ValueError(
            f"--peer {spec!r}: {model_file} does not exist; pass the root of a checkout of "
            f"{PEERS[name].source} (the folder that holds net/model.py)."
        )
    return name, Path(root).expanduser().resolve()


def devices_for(choice: str) -> tuple[str, ...]:
    """"auto": the CPU, plus the GPU when there is one."""
    from VLDUNLib.inference import resolve_device

    if choice == "auto":
        return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return (resolve_device(choice).type,)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Full sizes by default; `--quick` shrinks everything so the test suite runs the whole path in seconds."""
    quick = bool(args.quick)
    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    if not presets:
        raise ValueError("--presets is empty; name at least one preset, e.g. --presets compact.")
    for preset in presets:
        make_config(preset)
    if args.batch_sizes:
        sizes = tuple(sorted({1, *parse_ints(args.batch_sizes, "--batch-sizes")}))
        batch_sizes = {"cpu": sizes, "cuda": sizes}
    elif quick:
        batch_sizes = {"cpu": (1, 2), "cuda": (1, 2)}
    else:
        batch_sizes = {"cpu": (1, 2, 4, 8, 16), "cuda": (1, 2, 4, 8, 16, 32, 64)}
    if args.volumes:
        volumes = () if args.volumes == "none" else tuple(parse_volume_size(v) for v in args.volumes.split(","))
    else:
        volumes = ((64, 64, 4),) if quick else ((256, 256, 100), (512, 512, 300))
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    if repeats < 1 or threads < 1 or args.volume_repeats < 1:
        raise ValueError("--repeats, --threads and --volume-repeats must be 1 or more.")
    return Settings(
        presets=presets,
        peers=tuple(parse_peer(spec) for spec in args.peer),
        slice_size=64 if quick else 256,
        batch_sizes=batch_sizes,
        repeats=repeats,
        warmup=1,
        volumes=volumes,
        volume_repeats=args.volume_repeats,
        threads=threads,
        devices=devices_for(args.device),
    )


# ---------------------------------------------------------------- inputs


def mni_template() -> sitk.Image:
    """Found without importing nilearn (slow, and nothing else of it is needed)."""
    spec = importlib.util.find_spec("nilearn")
    path = Path(spec.origin).parent / MNI_T1 if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ValueError(
            "The benchmark inputs are made from nilearn's MNI152 T1 template, which is not installed here; "
            "install nilearn (pip install nilearn)."
        )
    return sitk.ReadImage(str(path))


def resample_array(image: sitk.Image, size: Size3) -> np.ndarray:
    """The template's voxels resampled (trilinear) to `size` (W, H, S), as a (S, H, W) float32 array in [0, 1]."""
    w, h, s = size
    array = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))
    scaled = torch.nn.functional.interpolate(array[None, None], size=(s, h, w), mode="trilinear",
                                             align_corners=False)
    return (scaled[0, 0] / max(float(array.max()), 1.0)).clamp(0, 1).numpy()


def sample_slice(image: sitk.Image, size: int) -> torch.Tensor:
    """The template's central axial slice at size x size, (1, 1, size, size) in [0, 1]."""
    return torch.from_numpy(resample_array(image, (size, size, 1)))[None]


def write_volume(image: sitk.Image, size: Size3, path: Path) -> Path:
    """The template resampled to `size` as int16 (how MRI is stored), covering the same physical extent."""
    volume = sitk.GetImageFromArray(np.round(resample_array(image, size) * 1000).astype(np.int16))
    volume.SetSpacing([n * sp / m for n, sp, m in zip(image.GetSize(), image.GetSpacing(), size)])
    volume.SetOrigin(image.GetOrigin())
    volume.SetDirection(image.GetDirection())
    sitk.WriteImage(volume, str(path), useCompression=True)
    return path


def size_name(size: Size3) -> str:
    return "x".join(str(n) for n in size)


# ---------------------------------------------------------------- models


class GreyAsPeerInput(nn.Module):
    """A peer built for `channels`-channel images, run on grey slices: the slice repeated to every channel
    on the way in and the channels averaged on the way out, so it sees and returns what ours does."""

    def __init__(self, peer: nn.Module, channels: int) -> None:
        super().__init__()
        self.peer = peer
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peer(x.repeat(1, self.channels, 1, 1)).mean(1, keepdim=True)


def load_peer(name: str, root: Path) -> GreyAsPeerInput:
    """Import `root/net/model.py` (with `root` on sys.path for its own imports) and build the peer, seeded."""
    kind = PEERS[name]
    model_file = root / "net" / "model.py"
    spec = importlib.util.spec_from_file_location(f"vldun_peer_{name}", model_file)
    if spec is None or spec.loader is None:
        raise ValueError(f"peer {name}: {model_file} cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root))
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"peer {name}: {model_file} imports {error.name!r}, which is not installed here; "
            f"install it into this environment (pip install {error.name})."
        ) from error
    finally:
        sys.path.remove(str(root))
    if not hasattr(module, kind.class_name):
        raise ValueError(
            f"peer {name}: {model_file} defines no {kind.class_name}; is it a checkout of {kind.source}?"
        )
    torch.manual_seed(0)
    return GreyAsPeerInput(getattr(module, kind.class_name)(**kind.kwargs), kind.channels).eval()


def preset_model(preset: str, workdir: Path) -> tuple[nn.Module, str | None, str]:
    """The model, the weights file a child process loads (None: the shipped file) and the weights' origin.

    Presets without shipped weights get seeded random ones, saved so that the volume run loads a real
    file like a user's run does.
    """
    from VLDUNLib.network import VLDUN
    from VLDUNLib.weights import DEFAULT_WEIGHTS, ModelInfo, load_model, save_weights

    if preset == "compact" and DEFAULT_WEIGHTS.is_file():
        model, _ = load_model(None)
        return model, None, "shipped"
    torch.manual_seed(0)
    config = make_config(preset)
    model = VLDUN(config).eval()
    info = ModelInfo(config, ["background"] + [f"c{i}" for i in range(1, config.num_classes)])
    path = workdir / f"{preset}.safetensors"
    save_weights(model, info, path)
    return model, str(path), "random init (speed does not depend on the weights)"


def preset_subject(preset: str, workdir: Path) -> Subject:
    from .complexity import parameter_count

    model, weights, origin = preset_model(preset, workdir)

    def prepare(sample: torch.Tensor) -> Callable[[torch.Tensor], object]:
        with torch.no_grad():
            prior = model.compute_prior(sample)
        pooled = prior.pooled() if prior is not None else None
        return lambda x: model(x, pooled.expand(len(x)) if pooled is not None else None)

    facts = {
        "params": model.unfolding_parameters(),
        "prior_params": parameter_count(model.prior),
        "total_params": parameter_count(model),
        "weights": origin,
        "note": "params and flops: unfolding network + heads per slice, the CLIP prior computed once per volume "
        "(prior_params, prior_flops: its own cost per call)",
    }
    return Subject(preset, model, prepare, ["--weights", weights] if weights else [], facts, model.compute_prior)


def peer_subject(name: str, root: Path) -> Subject:
    from .complexity import parameter_count

    model = load_peer(name, root)
    facts = {
        "params": parameter_count(model),
        "total_params": parameter_count(model),
        "weights": "random init (speed does not depend on the weights)",
        "source": str(root),
        "note": f"grey slice repeated to {model.channels} channels, output channels averaged; "
        "restores only (no segmentation head), so its volume run writes no label volume",
    }
    return Subject(name, model, lambda sample: model, ["--peer", f"{name}={root}"], facts)


# ---------------------------------------------------------------- per-slice speed


def halving_on_oom(fn: Callable[[int], T], batch: int) -> tuple[int, T]:
    """`fn(batch)`, halving the batch after each CUDA out-of-memory error: the largest batch that fits.

    The cache is emptied outside the `except` block, once the failed call's frames (and tensors) are gone.
    """
    while True:
        try:
            return batch, fn(batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise MemoryError("The GPU ran out of memory even at batch 1; run with --device cpu.") from None
        torch.cuda.empty_cache()
        batch //= 2


def timed_call(forward: Callable[[torch.Tensor], object], x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """One forward, waited for on the GPU (kernels run asynchronously) so the clock sees its real end."""

    def call() -> None:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            forward(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    return call


def graph_replay(forward: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], None]:
    """The bf16 forward captured once in a CUDA graph; each call replays it and waits for the GPU.

    At batch 1 a GPU waits on Python: the paper preset launches 1,646 kernels holding 6.8 ms of GPU work
    in a 37 ms eager pass on an H100; the replay skips the launches (7.1 ms there, 5.7 ms since the Bi-Mamba
    layers work in the kernel's layout; eager 33-62 ms, set by the host). Capture needs warm-up
    passes on a side stream first (cuDNN picks its algorithms there) and a forward with no host sync.
    """
    call = timed_call(forward, x, bf16=True)
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            call()
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph), torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        forward(x)

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize(x.device)

    return replay


def graph_figures(
    forward: Callable[[torch.Tensor], object], sample: torch.Tensor, settings: Settings
) -> dict[str, Any]:
    """Batch-1 bf16 latency replayed from a CUDA graph (the figure a GPU serving one slice at a time can reach)."""
    from .complexity import median_ms

    size = settings.slice_size
    try:
        ms, spread = median_ms(graph_replay(forward, sample), repeats=max(settings.repeats, 10), warmup=settings.warmup)
    except RuntimeError as error:
        return {f"cuda_bf16_graph_error_{size}_b1": str(error).splitlines()[0]}
    return {
        f"cuda_bf16_graph_ms_per_slice_{size}_b1": round(ms, 3),
        f"cuda_bf16_graph_ms_spread_{size}_b1": round(spread, 3),
    }


def batch_sweep(
    forward: Callable[[torch.Tensor], object],
    sample: torch.Tensor,
    batches: Sequence[int],
    settings: Settings,
    bf16: bool,
) -> dict[int, tuple[float, float]]:
    """Batch size -> (median, spread) ms per slice.

    Stops at the first size that had to be halved to fit the GPU, or whose throughput shows the peak is past.
    """
    from .complexity import median_ms

    def measure(batch: int) -> tuple[float, float]:
        x = sample.expand(batch, -1, -1, -1).contiguous()
        ms, spread = median_ms(timed_call(forward, x, bf16), repeats=settings.repeats, warmup=settings.warmup)
        return ms / batch, spread / batch

    results: dict[int, tuple[float, float]] = {}
    for wanted in batches:
        batch, result = halving_on_oom(measure, wanted)
        best = min(ms for ms, _ in results.values()) if results else result[0]
        results[batch] = result
        if batch < wanted or result[0] > PEAKED * best:
            break
    return results


def speed_figures(sweep: dict[int, tuple[float, float]], prefix: str, size: int) -> dict[str, Any]:
    """The JSON figures of one sweep: batch 1, the best batch and every batch tried."""
    best = min(sweep, key=lambda b: sweep[b][0])
    return {
        f"{prefix}_ms_per_slice_{size}_b1": round(sweep[1][0], 3),
        f"{prefix}_ms_spread_{size}_b1": round(sweep[1][1], 3),
        f"{prefix}_ms_per_slice_{size}_best": round(sweep[best][0], 3),
        f"{prefix}_ms_spread_{size}_best": round(sweep[best][1], 3),
        f"{prefix}_best_batch": best,
        f"{prefix}_slices_per_s_best": round(1e3 / sweep[best][0], 3),
        f"{prefix}_ms_per_slice_by_batch": {str(b): round(ms, 3) for b, (ms, _) in sweep.items()},
    }


def slice_speed(subject: Subject, sample: torch.Tensor, settings: Settings) -> dict[str, Any]:
    """fp32 figures on every device; on the GPU also bf16 autocast, eager and replayed from a CUDA graph."""
    figures: dict[str, Any] = {}
    for device in settings.devices:
        subject.module.to(device)
        x = sample.to(device)
        forward = subject.prepare(x)
        batches = settings.batch_sizes[device]
        for prefix, bf16 in ((device, False), ("cuda_bf16", True)) if device == "cuda" else ((device, False),):
            figures.update(speed_figures(batch_sweep(forward, x, batches, settings, bf16), prefix, settings.slice_size))
        if device == "cuda":
            figures.update(graph_figures(forward, x, settings))
    subject.module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return figures


def static_figures(subject: Subject, sample: torch.Tensor, size: int) -> dict[str, Any]:
    """Parameters and FLOPs (CPU, batch 1): the same counter for every model."""
    from .complexity import count_flops

    subject.module.to("cpu")
    forward = subject.prepare(sample)
    facts = dict(subject.facts)
    facts[f"flops_{size}"] = count_flops(lambda: forward(sample))
    if subject.prior is not None:
        prior = subject.prior
        facts["prior_flops"] = count_flops(lambda: prior(sample))
    return facts


# ---------------------------------------------------------------- whole volumes (child process)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far.

    On Linux VmHWM, not ru_maxrss: a process started by fork + exec inherits its parent's ru_maxrss, which
    would put the benchmark's own memory into every child's figure. Elsewhere ru_maxrss (bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def peer_volume(path: Path, out: Path, peer: tuple[str, Path], device: str, batch_size: int) -> None:
    """A peer's whole-volume run, like `predict_file`: read, normalise, restore slice batches, write.

    Slices are taken along numpy axis 0, the axis `write_volume` stacked them along (and the one
    `predict_file` picks for these volumes).
    """
    image = sitk.ReadImage(str(path))
    slices = sitk.GetArrayViewFromImage(image)
    window = fit_window(slices)
    model = load_peer(*peer).to(device)
    restored = np.empty(slices.shape, np.float32)

    def run(start: int, batch: int) -> int:
        stop = min(start + batch, len(slices))
        x = torch.from_numpy(to_unit_range(normalize(slices[start:stop], window)))[:, None].to(device)
        with torch.no_grad():
            restored[start:stop] = denormalize(model(x)[:, 0].float().cpu().numpy(), window)
        return stop

    start = 0
    while start < len(slices):
        batch_size, start = halving_on_oom(lambda batch: run(start, batch), batch_size)
    result = sitk.GetImageFromArray(restored)
    result.CopyInformation(image)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(result, str(out / "restored.nii.gz"), useCompression=True)


def volume_run(args: argparse.Namespace) -> dict[str, Any]:
    """One timed end-to-end run in this (child) process; torch's import is done and not timed."""
    torch.set_num_threads(args.threads)
    if args.peer:
        peer = parse_peer(args.peer)
        import_rss = peak_rss_mb()
        started = time.perf_counter()
        peer_volume(Path(args.volume), Path(args.out), peer, args.device, args.batch_size)
    else:
        from VLDUNLib.predict import predict_file

        import_rss = peak_rss_mb()
        started = time.perf_counter()
        predict_file(Path(args.volume), Path(args.out), weights=args.weights, device=args.device,
                     batch_size=args.batch_size)
    result = {
        "volume_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "import_rss_mb": import_rss,
        "outputs": sorted(p.name for p in Path(args.out).iterdir()),
    }
    if args.device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def child_run(subject: Subject, volume: Path, out: Path, device: str, batch: int, threads: int) -> dict[str, Any]:
    """Run one volume in a fresh `python -m vldun_lab.benchmark` process and read back its figures."""
    command = [sys.executable, "-m", "vldun_lab.benchmark", "--volume", str(volume), "--out", str(out),
               "--device", device, "--batch-size", str(batch), "--threads", str(threads), *subject.child_args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"The {subject.name} volume run on {device} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return result


def volume_figures(
    subject: Subject, volumes: dict[Size3, Path], speed: dict[str, Any], settings: Settings, workdir: Path
) -> dict[str, dict[str, dict[str, Any]]]:
    """Device -> volume size -> end-to-end figures, at the device's best batch size."""
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for device in settings.devices:
        batch = speed[f"{device}_best_batch"]
        for size, path in volumes.items():
            out = workdir / f"out_{subject.name}_{device}_{size_name(size)}"
            runs = [child_run(subject, path, out, device, batch, settings.threads)
                    for _ in range(settings.volume_repeats)]
            figures.setdefault(device, {})[size_name(size)] = summarise_runs(runs, batch)
    return figures


def summarise_runs(runs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    seconds = [r["volume_seconds"] for r in runs]
    summary = {
        "volume_seconds": round(statistics.median(seconds), 2),
        "volume_seconds_spread": round(max(seconds) - min(seconds), 2),
        "process_seconds": round(statistics.median(r["process_seconds"] for r in runs), 2),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "import_rss_mb": round(max(r["import_rss_mb"] for r in runs), 1),
        "batch_size": batch,
        "runs": len(runs),
        "outputs": runs[0]["outputs"],
    }
    if "peak_gpu_mb" in runs[0]:
        summary["peak_gpu_mb"] = round(max(r["peak_gpu_mb"] for r in runs), 1)
    return summary


# ---------------------------------------------------------------- report


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_ratio_metric(key: str) -> bool:
    """Figures compared as ours / peer: sizes, FLOPs, times and memory (lower is better for each)."""
    leaf = key.rsplit("/", 1)[-1]
    return leaf in ("params", "total_params", "volume_seconds", "peak_rss_mb", "peak_gpu_mb") or (
        leaf.startswith("flops_") or ("_ms_per_slice_" in leaf and "by_batch" not in key)
    )


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float]:
    """ours / peer for every figure both have (< 1: ours is smaller or faster), to 4 significant digits."""
    mine, theirs = flatten(ours), flatten(peer)
    return {
        key: float(f"{mine[key] / theirs[key]:.4g}")
        for key in mine
        if is_ratio_metric(key) and isinstance(theirs.get(key), (int, float)) and theirs[key]
    }


def machine_info(settings: Settings) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    info = {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "threads": settings.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "devices": list(settings.devices),
    }
    if "cuda" in settings.devices:
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def speed_prefixes(devices: Sequence[str]) -> list[str]:
    return [p for d in devices for p in ((d, "cuda_bf16") if d == "cuda" else (d,))]


def model_rows(models: dict[str, Any], size: int) -> list[list[object]]:
    return [[name, f"{m['params'] / 1e6:.2f}", f"{m['total_params'] / 1e6:.2f}", f"{m[f'flops_{size}'] / 1e9:.2f}",
             m["weights"].split(" (")[0]] for name, m in models.items()]


def speed_rows(models: dict[str, Any], size: int, devices: Sequence[str]) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, m in models.items():
        for p in speed_prefixes(devices):
            b1 = f"{m[f'{p}_ms_per_slice_{size}_b1']:.1f} ± {m[f'{p}_ms_spread_{size}_b1']:.1f}"
            best = f"{m[f'{p}_ms_per_slice_{size}_best']:.1f} ± {m[f'{p}_ms_spread_{size}_best']:.1f}"
            rows.append([name, p, b1, best, m[f"{p}_best_batch"], f"{m[f'{p}_slices_per_s_best']:.1f}"])
    return rows


def graph_rows(models: dict[str, Any], size: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, m in models.items():
        if f"cuda_bf16_graph_ms_per_slice_{size}_b1" in m:
            ms, spread = m[f"cuda_bf16_graph_ms_per_slice_{size}_b1"], m[f"cuda_bf16_graph_ms_spread_{size}_b1"]
            rows.append([name, f"{ms:.2f} ± {spread:.2f}"])
        elif f"cuda_bf16_graph_error_{size}_b1" in m:
            rows.append([name, f"not capturable: {m[f'cuda_bf16_graph_error_{size}_b1']}"])
    return rows


def volume_rows(models: dict[str, Any]) -> list[list[object]]:
    return [
        [name, device, volume, f"{v['volume_seconds']:.1f} ± {v['volume_seconds_spread']:.1f}",
         f"{v['peak_rss_mb']:.0f}", f"{v['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in v else "-", v["batch_size"]]
        for name, m in models.items() for device, sizes in m.get("volumes", {}).items() for volume, v in sizes.items()
    ]


def ratio_rows(ratio_vs_peer: dict[str, dict[str, dict[str, float]]]) -> list[list[object]]:
    return [[ours, peer, key, f"{value:.4g}"] for peer, by_preset in ratio_vs_peer.items()
            for ours, figures in by_preset.items() for key, value in figures.items()]


def report_text(report: dict[str, Any]) -> str:
    """The printed tables: models, per-slice speed, whole volumes and ours / peer ratios."""
    settings, models = report["settings"], report["models"]
    size = settings["slice_size"]
    parts = [
        f"VLDUN benchmark on {report['machine']['cpu']} ({settings['threads']} threads), devices "
        f"{', '.join(settings['devices'])}; median ± spread (max - min) of {settings['repeats']} runs after "
        f"{settings['warmup']} warm-up; input: {settings['input']}",
        table(["model", "params M", "total params M", f"GFLOP/slice {size}x{size}", "weights"],
              model_rows(models, size)),
        table(["model", "device", "batch 1 ms/slice", "best ms/slice", "best batch", "slices/s"],
              speed_rows(models, size, settings["devices"])),
    ]
    graphs = graph_rows(models, size)
    if graphs:
        parts.append(table(["model", "cuda bf16 CUDA-graph replay, batch 1 ms/slice"], graphs))
    volumes = volume_rows(models)
    if volumes:
        parts.append(table(["model", "device", "volume WxHxS", "end-to-end s", "peak RSS MB", "peak GPU MB", "batch"],
                           volumes))
    compared = ratio_rows(report["ratio_vs_peer"])
    if compared:
        parts.append(table(["ours", "peer", "figure", "ours / peer"], compared))
    return "\n\n".join(parts + ["\n".join(f"{name}: {m['note']}" for name, m in models.items())])


# ---------------------------------------------------------------- driver


def measure(
    subject: Subject, image: sitk.Image, volumes: dict[Size3, Path], settings: Settings, workdir: Path
) -> dict[str, Any]:
    """Every figure of one model; its volume runs use its best batch size on each device."""
    sample = sample_slice(image, settings.slice_size)
    figures = static_figures(subject, sample, settings.slice_size)
    figures.update(slice_speed(subject, sample, settings))
    if volumes:
        figures["volumes"] = volume_figures(subject, volumes, figures, settings, workdir)
    return figures


def run_benchmark(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Every preset, then every peer, one at a time (only one model is held at once)."""
    torch.set_num_threads(settings.threads)
    image = mni_template()
    volumes = {size: write_volume(image, size, workdir / f"mni_{size_name(size)}.nii.gz") for size in settings.volumes}
    models: dict[str, Any] = {}
    for preset in settings.presets:
        models[preset] = measure(preset_subject(preset, workdir), image, volumes, settings, workdir)
    peers: dict[str, Any] = {}
    for name, root in settings.peers:
        peers[name] = measure(peer_subject(name, root), image, volumes, settings, workdir)
    return {
        "machine": machine_info(settings),
        "settings": {
            "slice_size": settings.slice_size,
            "batch_sizes": {d: list(settings.batch_sizes[d]) for d in settings.devices},
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "volumes": [size_name(s) for s in settings.volumes],
            "volume_repeats": settings.volume_repeats,
            "threads": settings.threads,
            "devices": list(settings.devices),
            "input": "MNI152 T1 template (nilearn) resampled to each size",
            "flops_unit": "FLOP, 2 per multiply-add (torch FlopCounterMode)",
        },
        "models": {**models, **peers},
        "ratio_vs_peer": {
            peer: {ours: ratios(models[ours], theirs) for ours in models} for peer, theirs in peers.items()
        },
    }


def benchmark_command(args: argparse.Namespace) -> dict[str, Any]:
    """`vldun benchmark`: measure, print the tables and write `--json` when asked."""
    settings = settings_from_args(args)
    with tempfile.TemporaryDirectory(prefix="vldun_bench_") as workdir:
        report = run_benchmark(settings, Path(workdir))
    print(report_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nResults written to {args.json}")
    return report


def volume_parser() -> argparse.ArgumentParser:
    """The child process's command line (internal to `vldun benchmark`)."""
    parser = argparse.ArgumentParser(prog="python -m vldun_lab.benchmark", description="one timed whole-volume run")
    parser.add_argument("--volume", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--peer", default=None, help="NAME=PATH: run this peer instead of VLDUN")
    return parser


if __name__ == "__main__":
    from VLDUNLib.allocator import keep_freed_memory

    keep_freed_memory()  # as `vldun predict` does
    print(json.dumps(volume_run(volume_parser().parse_args())))
