"""`make demo` end to end on its built-in real sample (MNI152 T1 from nilearn), small."""

from __future__ import annotations

import json

import SimpleITK as sitk

from VLDUNLib.demo import run_demo
from VLDUNLib.weights import DEFAULT_WEIGHTS


def test_demo_writes_every_output_and_says_which_weights_ran(tmp_path, capsys):
    summary = run_demo(tmp_path, slices=2)
    for name in ("clean", "degraded", "restored", "segmentation"):
        assert sitk.ReadImage(str(tmp_path / f"{name}.nii.gz")).GetSize()[2] == 2
    assert (tmp_path / "montage.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["detected_modality"] == summary["detected_modality"]
    assert summary["psnr_input"] < 40
    printed = capsys.readouterr().out
    if DEFAULT_WEIGHTS.is_file():
        assert str(DEFAULT_WEIGHTS) in printed and "UNTRAINED" not in printed
    else:
        assert "UNTRAINED" in printed
    segments_line = next(line for line in printed.splitlines() if line.startswith("Segments:"))
    assert segments_line.split(":", 1)[1].strip()  # the segments, or why there are none


def test_a_demo_scan_left_unsegmented_says_why(tmp_path, capsys):
    from VLDUNLib.demo import print_summary

    summary = {"sample": "s", "degradation_applied": "d", "weights": "w", "psnr_input": 1.0, "psnr_restored": 2.0,
               "ssim_input": 0.1, "ssim_restored": 0.2, "detected_modality": "MRI · brain, T1c",
               "modality_probability": 0.9, "detected_degradation": "noise", "degradation_probability": 0.8,
               "out_of_distribution": True, "segments": [], "segmentation_note": "not segmented: unlike the training data"}
    print_summary(summary, tmp_path, trained=True)
    printed = capsys.readouterr().out
    assert "Segments:    not segmented: unlike the training data" in printed
    assert "unknown scan, unlike the training data (nearest: MRI · brain, T1c)" in printed
