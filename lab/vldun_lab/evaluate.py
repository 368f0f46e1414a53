"""`vldun evaluate`: the paper's Table 1 metrics on any dataset folder in the nnU-Net layout.

Protocol (fixed, seeded, written into every report): each slice is normalised to [0, 1] by the shared
normalisation (`intensity.fit_window` per volume, then clipped), resized so its longer side is `size`
(as in training; `size` 0 keeps the scan's own resolution and segments at the model's training scale, as
Slicer does), and degraded by Cartesian undersampling (MRI; acceleration 4, 8 % centre) or radial
sparse-view sampling (CT; 60 spokes), with a generator seeded by the case name. PSNR and SSIM (data
range 1) compare the degraded input and the restored output with the clean slice, averaged over the
non-empty slices of a case, then over cases. Dice and IoU are computed per case over the whole volume,
then averaged over cases; a class absent from both prediction and reference in a case is left out.

Every case of a folder is evaluated except exactly those the weights record as trained on
(`extra.training_cases`, by folder name and case id; a slice range for a dataset split by slices), so an
external cohort is evaluated whole; the report gives each dataset's excluded count and why. For a modality
the model has no class for, modality accuracy is replaced by the share of cases flagged as unlike the
training data. `ood_fraction` is that share for every dataset: for a training dataset it is the false-alarm
rate of the unknown-scan score (`VLDUNLib.ood`). `cases.csv` lists every case with its own figures and what
the prior detected, to find the scans a mean hides; `degradation_confusion` in metrics.json (and the last
table of table.md) says which degradations the prior takes for which. `prior_sha256` fingerprints the weights'
CLIP prior, so rows of an ablation or design table can be seen (and, with `--ablation`, are checked) to share it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from argparse import Namespace
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from VLDUNLib.config import ABLATIONS, DEGRADATION_PROMPTS, NO_DEGRADATION
from VLDUNLib.degradations import (
    DEGRADATIONS,
    Degraded,
    gaussian_blur,
    gaussian_noise,
    low_resolution,
    motion,
    sparse_view_ct,
    undersample_mri,
)
from VLDUNLib.inference import Detection, VolumePredictor, prior_slice_indices
from VLDUNLib.intensity import fit_window, normalize, to_unit_range
from VLDUNLib.letterbox import resize_slices
from VLDUNLib.metrics import dice, iou, mean_defined, psnr, ssim
from VLDUNLib.weights import DEFAULT_WEIGHTS

from . import baseline  # noqa: F401 (registers architecture "unet")
from .datasets import (
    Case,
    CaseLike,
    DatasetInfo,
    SliceRef,
    load_case,
    read_datasets,
    voxel_volume_ml,
)
from .splits import _num_slices

TUMOUR_CLASSES = {"necrosis", "edema", "non_enhancing", "enhancing", "whole_tumor"}


@dataclass(frozen=True)
class Protocol:
    acceleration: float = 4.0
    center_fraction: float = 0.08
    spokes: int = 60
    size: int = 128

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size must be a number of pixels, or 0 for each scan's own resolution; got {self.size}.")

    def describe(self) -> str:
        scale = (
            f"resized to longer side {self.size}" if self.size
            else "kept at each scan's own resolution (segmented at the model's training scale, as in Slicer)"
        )
        return (
            f"MRI: Cartesian undersampling, acceleration {self.acceleration:g}, {self.center_fraction:.0%} fully "
            f"sampled centre, random lines; CT: radial sparse-view sampling, {self.spokes} spokes; slices "
            f"normalised to [0, 1] by the shared normalisation and {scale}; "
            "PSNR/SSIM with data range 1; seeds from the case names"
        )

    def scaled(self, slices: np.ndarray, kind: Literal["image", "label"]) -> np.ndarray:
        """Slices at the protocol's size; `size` 0 leaves them at the scan's own resolution."""
        return resize_slices(slices, self.size, kind) if self.size else slices


def case_seed(case_id: str, channel: int) -> int:
    return int(hashlib.sha256(f"{case_id}/{channel}".encode()).hexdigest()[:12], 16)


def degrade_protocol(clean: torch.Tensor, imaging: str, protocol: Protocol, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if imaging == "CT":
        return sparse_view_ct(clean, protocol.spokes, generator).image
    return undersample_mri(clean, protocol.acceleration, protocol.center_fraction, generator=generator).image


def primitive_trials(clean: torch.Tensor, imaging: str, protocol: Protocol, seed: int) -> list[tuple[int, torch.Tensor]]:
    """(label, degraded) pairs of known degradation for measuring the degradation prior's accuracy."""
    generator = torch.Generator().manual_seed(seed)
    trials = [
        gaussian_noise(clean, 0.06, generator),
        gaussian_blur(clean, 1.5),
        motion(clean, 5.0, generator),
        low_resolution(clean, 3.0),
    ]
    protocol_kind = "sparse_view" if imaging == "CT" else "undersampling"
    trials.append(Degraded(degrade_protocol(clean, imaging, protocol, seed), DEGRADATIONS.index(protocol_kind)))
    return [(t.label, t.image) for t in trials]


class Evaluator:
    def __init__(self, predictor: VolumePredictor, protocol: Protocol) -> None:
        self.predictor = predictor
        self.model = predictor.model
        self.info = predictor.info
        self.protocol = protocol
        self.training_cases: dict[str, list[str]] = self.info.extra.get("training_cases") or {}
        """Dataset folder name -> the case ids (or "case[a:b]" slice ranges) the weights were trained on."""
        self.excluded: dict[str, int] = {}
        self.case_rows: list[dict[str, Any]] = []
        """One flat row per evaluated case and channel, for cases.csv."""

    def cases(self, dataset: DatasetInfo, max_cases: int | None) -> list[CaseLike]:
        """Every case (or slice range) of the folder that these weights never trained on (`unseen_cases`)."""
        cases, excluded = unseen_cases(dataset, self.training_cases.get(dataset.name, []))
        self.excluded[dataset.name] = excluded
        return cases[:max_cases] if max_cases else cases

    @torch.no_grad()
    def run_case(self, dataset: DatasetInfo, case: CaseLike, channel: int) -> dict[str, Any]:
        image, label = load_case(case, channel)
        clean_np = to_unit_range(normalize(image, fit_window(image)))
        scaled = np.ascontiguousarray(self.protocol.scaled(clean_np, "image"), dtype=np.float32)
        clean = torch.from_numpy(scaled)[:, None]
        reference = self.protocol.scaled(label, "label") if label is not None else None
        seed = case_seed(case.case_id, channel)
        degraded = degrade_protocol(clean, dataset.imaging, self.protocol, seed)
        device = self.predictor.device
        rep = prior_slice_indices(len(clean))
        prior = self.predictor.scan_prior(degraded[rep].to(device))
        detection = self.predictor.detection(prior.native if prior else None)
        restored, logits = [], []
        for start in range(0, len(clean), 16):
            part = degraded[start : start + 16].to(device)
            part_prior = prior.expand(len(part)) if prior is not None else None
            part_restored, part_logits = self.predictor.forward_slices(part, part_prior)
            if part_restored is not None:
                restored.append(part_restored.clamp(0, 1).cpu())
            if part_logits is not None:
                logits.append(part_logits.cpu())
        result: dict[str, Any] = {"detection": detection}
        nonempty = [i for i in range(len(clean)) if clean[i].max() > 0]
        result["input"] = slice_metrics(degraded, clean, nonempty)
        if restored:
            restored_t = torch.cat(restored)
            result["model"] = slice_metrics(restored_t, clean, nonempty)
            result["restored"] = restored_t
        result["degraded"], result["clean"] = degraded, clean
        if logits and reference is not None and dataset.short_name in self.info.dataset_classes:
            result["labels"] = self.dataset_labels(torch.cat(logits), dataset.short_name)
            result["reference"] = reference
        result["voxel_ml"] = scaled_voxel_ml(case, image.shape[1:], scaled.shape[1:])
        result["degradation_trials"] = self.degradation_trials(clean[rep], dataset.imaging, seed)
        result["clean_restored"] = self.clean_restoration(clean[rep])
        return result

    def clean_restoration(self, clean: torch.Tensor) -> dict[str, float | None]:
        """PSNR/SSIM of the model's restoration of the clean slices against themselves: restoring a scan that
        needs none must not damage it (the "none" degradation's promise)."""
        device = self.predictor.device
        prior = self.predictor.scan_prior(clean.to(device))
        restored, _ = self.predictor.forward_slices(clean.to(device), prior.expand(len(clean)) if prior else None)
        if restored is None:
            return {"psnr": None, "ssim": None}
        nonempty = [i for i in range(len(clean)) if clean[i].max() > 0]
        return slice_metrics(restored.clamp(0, 1).cpu(), clean, nonempty)

    def dataset_labels(self, logits: torch.Tensor, short_name: str) -> np.ndarray:
        """Argmax over background + the dataset's own classes, numbered as in its dataset.json."""
        ids = torch.tensor([0] + self.info.dataset_classes[short_name])
        return logits.index_select(1, ids).argmax(1).numpy().astype(np.uint8)

    def degradation_trials(self, clean: torch.Tensor, imaging: str, seed: int) -> list[tuple[str, str]]:
        """(true, detected) degradation names of the known-label trials; none for a model without a prior."""
        trials = []
        device = self.predictor.device
        names = self.model.config.degradations
        cases = [(DEGRADATIONS[label], degraded) for label, degraded in primitive_trials(clean, imaging, self.protocol, seed)]
        if NO_DEGRADATION in names:
            cases.append((NO_DEGRADATION, clean))
        for truth, degraded in cases:
            prior = self.predictor.slice_prior(degraded.to(device))
            if prior is None:
                return []
            trials.append((truth, names[int(prior.degradation_probs.argmax())]))
        return trials

    def evaluate(self, dataset: DatasetInfo, max_cases: int | None, montage_dir: Path | None) -> dict[str, Any]:
        cases = self.cases(dataset, max_cases)
        class_names = {v: k for k, v in dataset.labels.items() if v != 0}
        rows: list[dict[str, Any]] = []
        montage_rows = []
        for case in cases:
            for channel, channel_name in sorted(dataset.channels.items()):
                result = self.run_case(dataset, case, channel)
                result["truth"] = f"{dataset.short_name}/{channel_name}"
                result["truth_name"] = self.info.modality_names.get(result["truth"], result["truth"])
                rows.append(summarise_case(result, class_names))
                self.case_rows.append(case_row(dataset.name, case.case_id, result["detection"], rows[-1]))
                if len(montage_rows) < 3 and "restored" in result:
                    montage_rows.append(result)
        if montage_dir is not None and montage_rows:
            save_montage(montage_rows, montage_dir / f"{dataset.name}.png")
        report = aggregate(rows, len(cases), self.model.config.modalities, self.model.prior is not None)
        report["excluded"] = {"cases": self.excluded[dataset.name], "why": "trained on by these weights"}
        return report


def _slice_range(entry: str) -> tuple[str, int, int] | None:
    """"case[a:b]" -> (case, a, b); None for a plain case id."""
    match = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", entry)
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def unseen_cases(dataset: DatasetInfo, trained: list[str]) -> tuple[list[CaseLike], int]:
    """The folder's cases minus exactly the ones trained on, and how many were excluded.

    A case trained on in part (a single-patient dataset split by slices) contributes its other slices as
    `SliceRef`s; a folder the weights never saw is evaluated whole, so an external cohort is never cut down.
    """
    whole = {entry for entry in trained if _slice_range(entry) is None}
    ranges: dict[str, list[tuple[int, int]]] = {}
    for entry in trained:
        if (parsed := _slice_range(entry)) is not None:
            ranges.setdefault(parsed[0], []).append(parsed[1:])
    cases: list[CaseLike] = []
    excluded = 0
    for case in dataset.cases:
        if case.case_id in whole:
            excluded += 1
        elif case.case_id in ranges:
            excluded += 1
            cases += _untrained_slices(case, ranges[case.case_id])
        else:
            cases.append(case)
    return cases, excluded


def _untrained_slices(case: Case, trained: list[tuple[int, int]]) -> list[SliceRef]:
    """Contiguous slice ranges of `case` outside every trained range."""
    count = _num_slices(case)
    seen = np.zeros(count, bool)
    for start, stop in trained:
        seen[start:stop] = True
    refs, start = [], None
    for index in range(count + 1):
        free = index < count and not seen[index]
        if free and start is None:
            start = index
        elif not free and start is not None:
            refs.append(SliceRef(case, start, index))
            start = None
    return refs


def slice_metrics(pred: torch.Tensor, clean: torch.Tensor, indices: list[int]) -> dict[str, float]:
    values = [(psnr(pred[i, 0].numpy(), clean[i, 0].numpy()), ssim(pred[i, 0].numpy(), clean[i, 0].numpy())) for i in indices]
    return {"psnr": float(np.mean([v[0] for v in values])), "ssim": float(np.mean([v[1] for v in values]))}


def scaled_voxel_ml(case: CaseLike, native: tuple[int, ...], scaled: tuple[int, ...]) -> float:
    """A voxel's volume in mL at the evaluated in-plane size: the file's voxel, times the resizing's area factor."""
    return voxel_volume_ml(case) * (native[0] * native[1]) / (scaled[0] * scaled[1])


def tumour_free_slices(pred: np.ndarray, ref: np.ndarray, clean: torch.Tensor, voxel_ml: float) -> dict[str, float]:
    """Specificity on healthy tissue: tumour labelled on the slices whose reference has none (and that show tissue).

    Returns how many such slices there are, the share of them given any tumour voxel, and the tumour mL labelled
    on them in all.
    """
    free = [i for i in range(len(ref)) if not ref[i].any() and clean[i].max() > 0]
    labelled = [int((pred[i] > 0).sum()) for i in free]
    return {"slices": len(free), "with_tumour": float(np.mean([n > 0 for n in labelled])) if free else None,
            "tumour_ml": float(sum(labelled)) * voxel_ml}


def summarise_case(result: dict[str, Any], class_names: dict[int, str]) -> dict[str, Any]:
    det = result["detection"]
    row: dict[str, Any] = {
        "input": result["input"],
        "model": dict(result.get("model", {})),
        "truth": result["truth"],
        "modality_correct": det.modality == result["truth_name"],
        "modality_key_correct": det.modality_key == result["truth"],
        "ood": det.out_of_distribution,
        "degradation_trials": result["degradation_trials"],
        "clean_restored": result.get("clean_restored", {}),
    }
    if "labels" in result:
        pred, ref = result["labels"], result["reference"]
        row["dice"] = {name: dice(pred, ref, value) for value, name in class_names.items()}
        row["iou"] = {name: iou(pred, ref, value) for value, name in class_names.items()}
        if TUMOUR_CLASSES & set(class_names.values()):
            row["tumour_free"] = tumour_free_slices(pred, ref, result["clean"], result["voxel_ml"])
            if "whole_tumor" not in class_names.values():  # BraTS 2018 labels it; BraTS 2015's sub-regions make it
                row["dice"]["whole_tumor"] = dice((pred > 0).astype(np.uint8), (ref > 0).astype(np.uint8), 1)
    return row


def case_row(dataset: str, case_id: str, detection: Detection, summary: dict[str, Any]) -> dict[str, Any]:
    """A case's line of cases.csv: its PSNR/SSIM, foreground Dice (mean and per class) and the detection."""
    row: dict[str, Any] = {
        "dataset": dataset, "case": case_id, "truth": summary["truth"],
        "detected_modality": detection.modality_key, "modality_probability": round(detection.modality_probability, 4),
        "out_of_distribution": detection.out_of_distribution, "ood_score": detection.ood_score,
        "detected_degradation": detection.degradation,
    }
    for stage in ("input", "model"):
        row.update({f"{stage}_{k}": summary[stage].get(k) for k in ("psnr", "ssim")})
    dice = summary.get("dice", {})
    row["dice_mean"] = mean_defined(dice[name] for name in mean_classes(dice))
    row.update({f"dice_{name}": v for name, v in dice.items()})
    return row


def write_case_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """cases.csv: the union of the rows' columns (each dataset has its own classes), blank where undefined."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


def mean_classes(dice: dict[str, Any]) -> list[str]:
    """The classes a case's mean Dice averages: its own classes, not the derived whole tumour, unless that is the
    only one (a dataset labelled with whole tumour alone, BraTS 2018)."""
    names = [name for name in dice if name != "whole_tumor"]
    return names or list(dice)


def aggregate(rows: list[dict[str, Any]], cases: int, modalities: tuple[str, ...], has_prior: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cases": cases,
        "input": {k: mean_defined([r["input"][k] for r in rows]) for k in ("psnr", "ssim")},
        "model": {k: mean_defined([r["model"].get(k) for r in rows]) for k in ("psnr", "ssim")},
    }
    if any("dice" in r for r in rows):
        names = mean_classes(rows[0]["dice"])
        out["model"]["dice"] = {n: mean_defined([r["dice"][n] for r in rows]) for n in rows[0]["dice"]}
        out["model"]["iou"] = {n: mean_defined([r["iou"][n] for r in rows]) for n in names}
        out["model"]["dice_mean"] = mean_defined([out["model"]["dice"][n] for n in names])
        out["model"]["iou_mean"] = mean_defined([out["model"]["iou"][n] for n in names])
    out["clean_restored"] = {k: mean_defined([r["clean_restored"].get(k) for r in rows]) for k in ("psnr", "ssim")}
    if free := [r["tumour_free"] for r in rows if "tumour_free" in r]:
        slices = sum(f["slices"] for f in free)
        out["tumour_free"] = {
            "slices": slices, "tumour_ml": sum(f["tumour_ml"] for f in free),
            "with_tumour": sum(f["with_tumour"] * f["slices"] for f in free if f["slices"]) / slices if slices else None,
        }
    known = has_prior and all(r["truth"] in modalities for r in rows)
    # what a person reads ("MRI · brain, FLAIR"), which also picks the task; the key tells the datasets apart
    out["modality_accuracy"] = mean_defined([float(r["modality_correct"]) for r in rows]) if known else None
    out["modality_key_accuracy"] = mean_defined([float(r["modality_key_correct"]) for r in rows]) if known else None
    out["ood_fraction"] = mean_defined([float(r["ood"]) for r in rows]) if has_prior else None
    trials = [t for r in rows for t in r["degradation_trials"]]
    out["degradation_accuracy"] = float(np.mean([truth == seen for truth, seen in trials])) if trials else None
    out["degradation_confusion"] = confusion(trials) if trials else None
    return out


def confusion(trials: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{true degradation: {detected: count}}: which look-alikes the prior mixes up (blur and low resolution, say)."""
    counts = Counter(trials)
    table: dict[str, dict[str, int]] = {}
    order = {name: i for i, name in enumerate(DEGRADATION_PROMPTS)}
    for truth, seen in sorted(counts, key=lambda pair: (order[pair[0]], order[pair[1]])):
        table.setdefault(truth, {})[seen] = counts[truth, seen]
    return table


def save_montage(results: list[dict[str, Any]], path: Path) -> None:
    """Degraded / restored / clean / segmentation overlay, one row per case (its middle slice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 4, figsize=(12, 3.2 * len(results)), squeeze=False)
    for row, result in zip(axes, results):
        k = len(result["clean"]) // 2
        images = (result["degraded"][k, 0], result["restored"][k, 0], result["clean"][k, 0])
        for ax, image, title in zip(row, images, ("degraded", "restored", "clean")):
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title)
        row[3].imshow(result["restored"][k, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        if "labels" in result:
            row[3].imshow(np.ma.masked_equal(result["labels"][k], 0), cmap="tab10", alpha=0.5, interpolation="nearest")
            row[3].contour(result["reference"][k] > 0, levels=[0.5], colors="yellow", linewidths=0.8)
        row[3].set_title("segmentation (yellow: reference)")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(report: dict[str, Any]) -> str:
    """Rows like the paper's Table 1: PSNR / SSIM / Dice per dataset and their average."""
    names = list(report["datasets"])
    header = "| Method | " + " | ".join(f"{n} PSNR | {n} SSIM | {n} Dice" for n in names) + " | Avg PSNR | Avg SSIM | Avg Dice |"
    lines = [header, "|" + "---|" * (1 + 3 * len(names) + 3)]
    for row_name, key in (("Degraded input", "input"),) + tuple((m, m) for m in report.get("models", ["model"])):
        cells, psnrs, ssims, dices = [], [], [], []
        for n in names:
            entry = report["datasets"][n].get(key, {})
            p, s, d = entry.get("psnr"), entry.get("ssim"), entry.get("dice_mean")
            psnrs.append(p), ssims.append(s), dices.append(d)
            cells += [fmt(p, 2), fmt(s, 4), fmt(d, 4)]
        cells += [fmt(mean_defined(psnrs), 2), fmt(mean_defined(ssims), 4), fmt(mean_defined(dices), 4)]
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{n} {report['datasets'][n]['cases']} evaluated, {report['datasets'][n]['excluded']['cases']} "
                       "excluded (trained on)" for n in names if "excluded" in report["datasets"][n])
    return "\n".join(lines) + "\n" + (f"\nCases: {counts}.\n" if counts else "")


def comparison(report: dict[str, Any]) -> str:
    """How much the model beats (or trails) the baseline, per dataset."""
    lines = ["", "| Dataset | PSNR model - baseline (dB) | SSIM model - baseline | Dice model - baseline |", "|---|---|---|---|"]
    for name, entry in report["datasets"].items():
        model, peer = entry["model"], entry["baseline"]
        cells = [difference(model.get(k), peer.get(k), digits) for k, digits in (("psnr", 2), ("ssim", 4), ("dice_mean", 4))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def degradation_table(report: dict[str, Any]) -> str:
    """Per dataset and true degradation: trials detected right, and what the prior took the others for most often."""
    entries = {n: e["degradation_confusion"] for n, e in report["datasets"].items() if e.get("degradation_confusion")}
    if not entries:
        return ""
    kinds = [*DEGRADATIONS, *([NO_DEGRADATION] if any(NO_DEGRADATION in t for t in entries.values()) else [])]
    lines = ["", "Degradation prior, right / trials (most frequent wrong detection):", "",
             "| Dataset | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, table in entries.items():
        lines.append(f"| {name} | " + " | ".join(confusion_cell(table.get(d, {}), d) for d in kinds) + " |")
    return "\n".join(lines) + "\n"


def trust_table(report: dict[str, Any], native: bool = True) -> str:
    """Per dataset, what the model knows about itself: detection accuracy, scans flagged unknown (false alarms:
    every dataset here is a training one), clean slices restored against themselves, tumour on tumour-free slices.
    Unless `native`, the slices were resized first, which Slicer and `vldun predict` never do: the prior's figures
    (detection, unknown share) are then not those a user meets, and the table says so."""
    caveat = ("" if native else " (slices resized first, unlike Slicer and `vldun predict`: for the detection and "
              "unknown-scan figures a user meets, use --size 0)")
    lines = ["", f"Detection and specificity{caveat}:", "",
             ("| Dataset | modality right | degradation right | flagged unknown | clean slice restored PSNR (dB) "
              "| tumour-free slices given tumour | tumour on them (mL) |"), "|---|---|---|---|---|---|---|"]
    for name, entry in report["datasets"].items():
        free = entry.get("tumour_free") or {}
        cells = [fmt(entry.get("modality_accuracy"), 3), fmt(entry.get("degradation_accuracy"), 3),
                 fmt(entry.get("ood_fraction"), 3), fmt(entry.get("clean_restored", {}).get("psnr"), 2),
                 (f"{fmt(free.get('with_tumour'), 3)} of {free['slices']}" if free else "-"),
                 fmt(free.get("tumour_ml"), 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def confusion_cell(detected: dict[str, int], truth: str) -> str:
    if not detected:
        return "-"
    cell = f"{detected.get(truth, 0)}/{sum(detected.values())}"
    wrong = {seen: n for seen, n in detected.items() if seen != truth}
    if wrong:
        seen = max(wrong, key=wrong.get)
        cell += f" ({wrong[seen]} {seen})"
    return cell


def difference(a: float | None, b: float | None, digits: int) -> str:
    return "-" if a is None or b is None else f"{a - b:+.{digits}f}"


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


ABLATION_RUNS = Path("runs") / "ablations"
"""Where the ablation recipes write their weights (relative to the working directory)."""


def ablation_weights(name: str) -> Path:
    """The weights of a Table 3 row, which the lab trains at one budget (`recipes/ablations/`; they do not ship), the
    full model's row included; a clear error if absent."""
    if name not in ABLATIONS:
        raise ValueError(f"Unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}.")
    path = ABLATION_RUNS / name / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"No weights for ablation {name!r} at {path}; train them first "
                                f"(`vldun train recipes/ablations/{name}.yaml`) or pass --weights.")
    return path


MIRROR_NOTE = "; segmentation averaged over the slice and its 3 mirror images (`--mirror`), model and baseline"


def prior_fingerprint(weights: Path) -> str | None:
    """SHA-256 of the CLIP prior's tensors in a weights file (None without a prior). Rows that train stage 2 only
    keep the prior they copied unchanged, so rows with different fingerprints started from different priors."""
    with safe_open(str(weights), framework="pt") as handle:
        names = handle.keys()  # a safetensors handle is not iterable
        keys = sorted(k for k in names if k.startswith("prior."))
        if not keys:
            return None
        digest = hashlib.sha256()
        for key in keys:
            digest.update(key.encode())
            digest.update(handle.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ablation(predictor: VolumePredictor, name: str, weights: Path | None = None,
                   control: Path | None = None) -> None:
    """Refuse weights that are not the named row, or whose prior differs from the control row's (`control`, the
    full model's weights): the table's differences would then mix the ablation with a change of prior."""
    config = predictor.model.config
    wrong = {k: v for k, v in ABLATIONS[name].items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"These weights are not the {name!r} ablation (config differs in {sorted(wrong)}).")
    if weights is None or control is None or not control.is_file() or Path(weights).resolve() == control.resolve():
        return
    mine, theirs = prior_fingerprint(Path(weights)), prior_fingerprint(control)
    if mine is not None and theirs is not None and mine != theirs:
        raise ValueError(f"{weights} and the full row {control} started from different CLIP priors (the shipped "
                         "weights changed between them); train both rows again from the same shipped weights.")


def evaluate_command(args: Namespace) -> dict[str, Any]:
    weights = args.weights or (ablation_weights(args.ablation) if args.ablation else None)
    protocol = Protocol(args.acceleration, args.center_fraction, args.spokes, args.size)
    predictor = VolumePredictor(weights, device=args.device, mirror=args.mirror)
    if args.ablation:
        check_ablation(predictor, args.ablation, Path(weights), ABLATION_RUNS / "full" / "model.safetensors")
    baseline = VolumePredictor(args.baseline, device=args.device, mirror=args.mirror) if args.baseline else None
    return write_report(predictor, read_datasets(args.data), protocol, Path(args.out), args.max_cases,
                        str(weights or DEFAULT_WEIGHTS), baseline)


def write_report(
    predictor: VolumePredictor,
    datasets: list[DatasetInfo],
    protocol: Protocol,
    out: Path,
    max_cases: int | None,
    weights_name: str,
    baseline: VolumePredictor | None = None,
) -> dict[str, Any]:
    """metrics.json, table.md and montages; with `baseline`, its figures sit beside the model's as "baseline"."""
    out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(predictor, protocol)
    report: dict[str, Any] = {
        "protocol": protocol.describe(),
        "weights": weights_name,
        "mirror": predictor.mirror,
        "architecture": predictor.model.config.architecture,
        "prior_sha256": prior_fingerprint(Path(weights_name)) if Path(weights_name).is_file() else None,
        "datasets": {d.name: evaluator.evaluate(d, max_cases, out / "montages") for d in datasets},
    }
    if baseline is not None:
        peer = Evaluator(baseline, protocol)
        report["models"] = ["model", "baseline"]
        for d in datasets:
            report["datasets"][d.name]["baseline"] = peer.evaluate(d, max_cases, None)["model"]
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_case_table(out / "cases.csv", evaluator.case_rows)
    text = (markdown_table(report) + (comparison(report) if baseline is not None else "")
            + trust_table(report, native=protocol.size == 0)
            + degradation_table(report))
    prior = f" (CLIP prior {report['prior_sha256'][:12]})" if report["prior_sha256"] else ""
    (out / "table.md").write_text(f"Protocol: {protocol.describe()}\n\nWeights: {weights_name}{prior}"
                                  f"{MIRROR_NOTE if predictor.mirror else ''}\n\n" + text)
    print(text)
    print(f"Report written to {out}/ (metrics.json, table.md, cases.csv, montages/)")
    return report
