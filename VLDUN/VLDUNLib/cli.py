"""`vldun`: restore and segment volume files (`predict`), or try it on a built-in sample (`demo`).

The lab (training, evaluation, benchmarks; `pip install -e lab` from a clone) adds its own subcommands through
the `vldun.plugins` entry point; the product never imports it.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

MIRROR_HELP = ("average the segmentation over the slice and its 3 mirror images, as nnU-Net does at test time: "
               "4x the segmentation pass (its measured effect per dataset is in MODEL_CARD.md)")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), weights=args.weights, slices=args.slices)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predict import predict_cohort

    failed = predict_cohort([Path(p) for p in args.inputs], Path(args.out), weights=args.weights, device=args.device,
                            batch_size=args.batch_size, degradation=args.degradation, mirror=args.mirror,
                            overwrite=args.overwrite, workers=args.workers, allow_label_maps=args.allow_label_maps,
                            task=args.task)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vldun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--task", default="auto",
                   help="classes to segment: heart, brain_tumour, lung_infection, abdominal_organs (the model's "
                   "tasks), or auto (default): the detected modality's task, and none for a scan unlike the "
                   "training data")
    p.add_argument("--workers", type=int, default=1,
                   help="CPU processes that take a cohort's cases in turn, sharing the cores (default 1); each "
                   "holds its own model and volume, so memory grows with them")
    p.add_argument("--allow-label-maps", action="store_true",
                   help="restore integer volumes with few distinct values, which are otherwise refused as label maps")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.set_defaults(func=_predict)

    _add_plugins(sub)
    return parser


LAB_COMMANDS = ("train", "prepare", "evaluate", "calibrate-ood", "curve", "ship", "benchmark", "complexity")


def _add_plugins(sub: argparse._SubParsersAction) -> None:
    """Subcommands of installed plugins (the lab); without the lab, its commands say how to get it."""
    problem = "it is not installed"
    for entry in entry_points(group="vldun.plugins"):
        try:
            register = entry.load()
        except ImportError as error:
            problem = f"it could not be imported ({error})"
            continue
        register(sub)
    for name in LAB_COMMANDS:
        if name not in sub.choices:
            p = sub.add_parser(name, help="(needs the VLDUN lab: pip install -e lab)", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=_lab_missing, problem=problem)


def _lab_missing(args: argparse.Namespace) -> int:
    raise ValueError(f"`vldun {args.command}` is part of the VLDUN lab and {args.problem}; from a clone of the "
                     "repository run `pip install -e lab`.")


def main(argv: list[str] | None = None) -> int:
    from .allocator import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"vldun {args.command}: interrupted; finished cases are kept and a rerun resumes.", file=sys.stderr)
        return 130
    except Exception as error:  # every foreseeable error is one line; the traceback only with --debug
        if getattr(args, "debug", False):
            raise
        print(f"vldun {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line; its type when the message alone would not say what happened."""
    message = " ".join(str(error).split())
    if isinstance(error, (ValueError, FileNotFoundError)) and message:
        return message
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
