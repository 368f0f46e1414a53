"""The lab's commands of `vldun` (train, prepare, evaluate, calibrate-ood, curve, ship, benchmark,
complexity), registered as a plugin.

`vldun` discovers this through the `vldun.plugins` entry point, so the product never imports the lab.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from VLDUNLib.cli import MIRROR_HELP


def _complexity(args: argparse.Namespace) -> int:
    from .complexity import complexity

    result = complexity(args.preset, size=args.size, repeats=args.repeats, threads=args.threads)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"preset {result['preset']}")
    print(f"  parameters (unfolding network + heads): {result['params'] / 1e6:.2f} M")
    print(f"  parameters (CLIP prior, run once per volume): {result['prior_params'] / 1e6:.2f} M")
    print(f"  FLOPs at {args.size}x{args.size}: {result['flops_256'] / 1e9:.1f} GFLOP (2 FLOP per multiply-add)")
    print(f"  prior FLOPs per call: {result['prior_flops'] / 1e9:.2f} GFLOP")
    print(
        f"  CPU latency: {result['cpu_ms_per_slice_256']:.0f} ms per slice "
        f"(median of {args.repeats}, spread {result['cpu_ms_spread']:.0f} ms, {result['threads']} threads)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import train_from_file

    train_from_file(Path(args.config), resume=args.resume, out=args.out, session_minutes=args.session_minutes,
                    export_checkpoint=args.export_checkpoint, time_steps=args.time_steps, threads=args.threads)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from . import prepared
    from .train import load_run_config

    run = load_run_config(Path(args.config))
    if any(d.endswith(prepared.SUFFIX) for d in run.data):
        raise ValueError(f"{args.config}: its data is already a prepared file; list the dataset folders to prepare")
    slices = prepared.from_folders(run.data, run.patch, run.val_fraction, run.split)
    path = prepared.save(slices, args.out)
    validation = sum(len(v) for v in slices.validation.values())
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {len(slices.train)} training and {validation} "
          f"validation slices of {len(slices.validation)} datasets at {run.patch} px. Train from it with "
          f"`data: [{path.resolve()}]` in a run config (same patch and val_fraction).")
    return 0


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads is a number of CPU threads, at least 1; got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_command

    _set_threads(args)
    evaluate_command(args)
    return 0


def _curve(args: argparse.Namespace) -> int:
    from .curve import curve_command

    curve_command(args)
    return 0


def _ship(args: argparse.Namespace) -> int:
    from .ship import ship_command

    ship_command(args)
    return 0


def _calibrate_ood(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_command

    _set_threads(args)
    calibrate_command(args)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from .benchmark import benchmark_command

    benchmark_command(args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the lab's subcommands to the `vldun` parser."""
    p = sub.add_parser("complexity", help="parameters, FLOPs at 256x256 and CPU latency of a preset")
    p.add_argument("--preset", default="compact")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_complexity)

    p = sub.add_parser("train", help="train both stages from a YAML run config")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--out", default=None, help="run folder instead of the config's `out:`")
    p.add_argument("--session-minutes", type=float, default=None,
                   help="checkpoint and stop after this many minutes; --resume continues exactly where it stopped "
                        "(`kill PID` or Ctrl-C also stops it after the step under way, checkpointed)")
    p.add_argument("--export-checkpoint", default=None, metavar="WEIGHTS",
                   help="train nothing: write the run's latest checkpoint as interim weights (.safetensors) to "
                        "evaluate while the run goes on")
    p.add_argument("--time-steps", type=int, default=0, metavar="N",
                   help="train nothing: time N steps of each stage on this machine and print seconds per step "
                        "(on a CPU the joint stage with the compiled scan and with PyTorch's)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads instead of the config's `threads:` (2 when the run has the machine to itself); "
                        "a resume may change it")
    p.set_defaults(func=_train)

    p = sub.add_parser("prepare", help="write a run's training and validation slices to one .vldun file")
    p.add_argument("config", help="the run config whose data, patch, val_fraction and seed to use")
    p.add_argument("--out", required=True, help="the file to write, ending in .vldun")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("evaluate", help="PSNR/SSIM/Dice/IoU report on datasets in the nnU-Net layout")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--baseline", default=None, help="weights of a peer (e.g. the joint U-Net) reported beside the model")
    p.add_argument("--ablation", default=None, help="evaluate the weights of this Table 3 ablation")
    p.add_argument("--acceleration", type=float, default=4.0)
    p.add_argument("--center-fraction", type=float, default=0.08)
    p.add_argument("--spokes", type=int, default=60)
    p.add_argument("--size", type=int, default=128,
                   help="slices are resized so the longer side is this; 0 keeps each scan's own resolution "
                   "(the Slicer path)")
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--mirror", action="store_true", help=MIRROR_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own); 1 beside a training run on a small machine, "
                        "where threads that share cores stall each other")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("calibrate-ood", help="fit the unknown-scan statistics of a model on its training datasets")
    p.add_argument("--data", nargs="+", required=True, help="the model's training dataset folders")
    p.add_argument("--weights", default=None, help="a .safetensors model (default: the shipped weights)")
    p.add_argument("--quantile", type=float, default=None,
                   help="share of validation scans (degraded and clean) under the threshold (default: the lowest of "
                        "0.95-0.99 whose held-out false alarms are within --max-false-alarms)")
    p.add_argument("--max-false-alarms", type=float, default=0.05,
                   help="most false alarms on held-out scans of the training datasets when choosing the quantile")
    p.add_argument("--margin", type=float, default=1.0, help="factor on that quantile's score")
    p.add_argument("--max-train-cases", type=int, default=None,
                   help="at most this many training cases per dataset for the statistics (default: all)")
    p.add_argument("--unseen", action="store_true",
                   help="also report the share flagged of each set of unseen scans (vldun_lab.unseen)")
    p.add_argument("--acceleration", type=float, default=4.0)
    p.add_argument("--center-fraction", type=float, default=0.08)
    p.add_argument("--spokes", type=int, default=60)
    p.add_argument("--write", action="store_true", help="store the statistics in the weights' JSON (tensors unchanged)")
    p.add_argument("--json", default=None, help="also write every figure printed to this JSON file")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own); 1 beside a training run on a small machine, "
                        "where threads that share cores stall each other")
    p.set_defaults(func=_calibrate_ood)

    p = sub.add_parser("curve", help="a run's losses as means over windows of steps (is a stage still learning?)")
    p.add_argument("run", help="the run's folder (its `out:`), e.g. runs/vldun_compact")
    p.add_argument("--every", type=int, default=500, help="steps per window (default 500)")
    p.set_defaults(func=_curve)

    p = sub.add_parser("ship", help="make a finished recipe's weights the shipped model (checks where they came from)")
    p.add_argument("weights", help="the run's model.safetensors, e.g. runs/vldun_compact/model.safetensors")
    p.set_defaults(func=_ship)

    p = sub.add_parser("benchmark", help="speed and memory of each preset (and peers)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--peer", action="append", default=[], help="NAME=PATH of a peer checkout, e.g. promptir=../PromptIR")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat: checks the whole path in seconds")
    p.add_argument("--presets", default="compact,paper", help="comma-separated presets (default: compact,paper)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the CPU, and the GPU when there is one")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every model (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 3, 1 with --quick)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated (default 1,2,4,8,16 on the CPU, up to 64 on the GPU; 1,2 with --quick)")
    p.add_argument("--volumes", default=None,
                   help="comma-separated WxHxS (default 256x256x100,512x512x300; 64x64x4 with --quick), or none")
    p.add_argument("--volume-repeats", type=int, default=1, help="end-to-end runs per volume (default 1)")
    p.set_defaults(func=_benchmark)
