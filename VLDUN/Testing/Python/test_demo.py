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
