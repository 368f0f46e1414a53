"""`vldun predict` on files: geometry kept exactly, bad files refused, the CLI reports errors cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from model_factory import tiny_predictor
from VLDUNLib.cli import main
from VLDUNLib.predict import predict_file, slice_axis_of
from VLDUNLib.weights import save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    predictor = tiny_predictor()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_weights(predictor.model, predictor.info, path)
    return path


def oblique_image(tmp_path, spacing=(1.0, 1.0, 5.0)):
    array = np.random.default_rng(0).normal(100, 30, (4, 20, 18)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -5.0, 3.0))
    c, s = np.cos(0.4), np.sin(0.4)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(image, str(path))
    return path, image


def test_outputs_keep_the_input_geometry(tmp_path, weights):
    path, image = oblique_image(tmp_path)
    before = path.read_bytes()
    detection = predict_file(path, tmp_path / "out", weights=str(weights), device="cpu")
    for name in ("restored", "segmentation"):
        result = sitk.ReadImage(str(tmp_path / "out" / f"{name}.nrrd"))
        assert result.GetSize() == image.GetSize()
        assert result.GetSpacing() == image.GetSpacing() and result.GetOrigin() == image.GetOrigin()
        assert np.allclose(result.GetDirection(), image.GetDirection())
    assert path.read_bytes() == before
    saved = json.loads((tmp_path / "out" / "detection.json").read_text())
    assert saved["modality"] == detection["modality"] and saved["slice_axis"] == 0


def test_thick_axis_is_the_slice_axis(tmp_path):
    _, image = oblique_image(tmp_path, spacing=(4.0, 1.0, 1.0))
    assert slice_axis_of(image) == 2


def test_vector_images_are_refused(tmp_path, weights):
    rgb = sitk.Image([16, 16, 3], sitk.sitkVectorFloat32, 3)
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(rgb, str(path))
    with pytest.raises(ValueError, match="components"):
        predict_file(path, tmp_path / "out", weights=str(weights))


def test_cli_reports_missing_files_without_a_traceback(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing.nii.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_mirror_flag_reaches_the_predictor(tmp_path, weights, monkeypatch):
    from VLDUNLib import inference

    seen = []
    original = inference.VolumePredictor.segment

    def spy(self, *args, **kwargs):
        seen.append(self.mirror)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(inference.VolumePredictor, "segment", spy)
    path, _ = oblique_image(tmp_path)
    for flags in ([], ["--mirror"]):
        assert main(["predict", str(path), "--out", str(tmp_path / "o"), "--weights", str(weights),
                     "--device", "cpu", *flags]) == 0
    assert seen and seen[0] is False and seen[-1] is True
