"""`vldun`: the command line of the library (demo, predict, train, prepare, evaluate, complexity, benchmark)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MIRROR_HELP = ("average the segmentation over the slice and its 3 mirror images: 4x the segmentation pass; "
               "held out, Dice +0.006 to +0.014 on ACDC and abdomen, -0.03 on COVID-19 and BraTS (MODEL_CARD.md)")


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


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), weights=args.weights, slices=args.slices)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predict import predict_cohort

    failed = predict_cohort([Path(p) for p in args.inputs], Path(args.out), weights=args.weights, device=args.device,
                            batch_size=args.batch_size, degradation=args.degradation, mirror=args.mirror,
                            overwrite=args.overwrite, workers=args.workers)
    return 1 if failed else 0


def _train(args: argparse.Namespace) -> int:
    from .train import train_from_file

    train_from_file(Path(args.config), resume=args.resume)
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


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_command

    evaluate_command(args)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from .benchmark import benchmark_command

    benchmark_command(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vldun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("complexity", help="parameters, FLOPs at 256x256 and CPU latency of a preset")
    p.add_argument("--preset", default="compact")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_complexity)

    p = sub.add_parser("demo", help="degrade, restore and segment a built-in real brain MRI sample")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--weights", default=None, help="a .safetensors model (default: the shipped weights)")
    p.add_argument("--slices", type=int, default=12)
    p.set_defaults(func=_demo)

    p = sub.add_parser("predict", help="restore and segment volume files (NIfTI/NRRD/MHA): one scan or a cohort")
    p.add_argument("inputs", nargs="+", metavar="input",
                   help="volume files or folders of them; more than one file gives one output subfolder per case")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="redo cases whose outputs are already in --out (by default they are skipped, so a rerun "
                   "resumes an interrupted cohort)")
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--degradation", default=None, help="known degradation instead of the detected one")
    p.add_argument("--mirror", action="store_true", help=MIRROR_HELP)
    p.add_argument("--workers", type=int, default=1,
                   help="CPU processes that take a cohort's cases in turn, sharing the cores (default 1); each "
                   "holds its own model and volume, so memory grows with them")
    p.set_defaults(func=_predict)

    p = sub.add_parser("train", help="train both stages from a YAML run config")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
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
    p.set_defaults(func=_evaluate)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    from .allocator import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"vldun {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
