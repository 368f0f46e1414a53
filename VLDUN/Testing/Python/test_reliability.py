"""Issue 40: nothing lost, nothing corrupt marked done. Every defect found by the review has a test here:
writes that fail or are interrupted, truncated or unsuitable inputs, outputs colliding with inputs, models
whose JSON was edited or names a remote CLIP, orphaned workers, resuming with other settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from model_factory import tiny_predictor
from VLDUNLib import weights as weights_module
from VLDUNLib.cli import main
from VLDUNLib.weights import WeightsError, read_model_info, rewrite_info, save_weights

VLDUN_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    predictor = tiny_predictor()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_weights(predictor.model, predictor.info, path)
    return path


def copy_model(weights: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / weights.name
    target.write_bytes(weights.read_bytes())
    target.with_suffix(".json").write_text(weights.with_suffix(".json").read_text())
    return target


def scan(folder: Path, name: str = "scan.nii.gz", shape=(4, 20, 18), seed: int = 0, dtype=np.float32,
         array: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(seed).normal(100, 30, shape).astype(dtype)
    path = folder / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


# --- 5. the model's JSON is sealed -------------------------------------------------------------------------

def test_swapping_two_class_names_is_refused(tmp_path, weights):
    model = copy_model(weights, tmp_path)
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["classes"][1], meta["classes"][2] = meta["classes"][2], meta["classes"][1]
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="config_sha256"):
        read_model_info(model)


def test_editing_the_ood_threshold_is_refused_and_rewrite_info_reseals(tmp_path, weights):
    model = copy_model(weights, tmp_path)
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["ood_threshold"] = 0.9
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="config_sha256"):
        read_model_info(model)
    _, info = read_model_info(weights)
    info.extra = {"note": "added later"}
    tensors = model.read_bytes()
    rewrite_info(model, info)
    assert read_model_info(model)[1].extra == {"note": "added later"}
    assert model.read_bytes() == tensors


def test_the_shipped_model_is_sealed_and_carries_no_machine_paths():
    shipped = VLDUN_DIR / "Resources" / "Models" / "vldun_compact.safetensors"
    assert weights_module.sha256_of(shipped) == "6f8490888342cb0aafe032aecdfbd49784dc29cee0485ad5bf7f5ef7b391f5ee"
    read_model_info(shipped)
    text = shipped.with_suffix(".json").read_text()
    assert "/work/" not in text and '"/' not in text


@pytest.mark.parametrize("content", ["[1, 2]", "[" * 100000 + "]" * 100000, '{"format": "vldun-weights/1", "config": 3}'])
def test_malformed_model_json_is_a_weights_error(tmp_path, weights, content):
    model = copy_model(weights, tmp_path)
    model.with_suffix(".json").write_text(content)
    with pytest.raises(WeightsError):
        read_model_info(model)


# --- 6. the prior may not name a remote or pickled CLIP -------------------------------------------------

@pytest.mark.parametrize("name", ["hf-hub:someone/model", "local-dir:/tmp/x", "../ViT-B-16", "NoSuchModel"])
def test_open_clip_model_names_only_builtin_architectures(name):
    from VLDUNLib.config import PriorConfig
    from VLDUNLib.priors import build_clip

    with pytest.raises(ValueError, match="open_clip"):
        build_clip(PriorConfig(open_clip_model=name))


def test_a_model_json_naming_hf_hub_is_refused(tmp_path, weights):
    model = copy_model(weights, tmp_path)
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["config"]["prior"]["open_clip_model"] = "hf-hub:evil/model"
    meta["config_sha256"] = weights_module.config_sha256(meta)
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="open_clip_model"):
        read_model_info(model)


# --- predict: writes ----------------------------------------------------------------------------------------

def run_cli(args: list[str], limit_bytes: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`vldun` in a fresh process, optionally under a file-size limit (SIGXFSZ ignored, as a full disk or a
    quota behaves: the write returns short and ITK only prints it)."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        limit = {limit_bytes!r}
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        from VLDUNLib.cli import main
        sys.exit(main({args!r}))
    """)
    env = {**os.environ, "PYTHONPATH": f"{VLDUN_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


def test_a_write_cut_short_fails_the_case_and_is_not_marked_done(tmp_path, weights):
    path = scan(tmp_path / "in", shape=(4, 64, 64))
    out = tmp_path / "out"
    result = run_cli(["predict", str(path), "--out", str(out), "--weights", str(weights), "--device", "cpu"],
                     limit_bytes=20_000)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "writing" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "detection.json").exists() and not (out / "restored.nii.gz").exists()
    assert not list(out.glob(".partial-*"))


def test_an_interrupted_overwrite_keeps_the_old_outputs_and_is_redone(tmp_path, weights, monkeypatch, capsys):
    from VLDUNLib import predict

    path = scan(tmp_path / "in")
    out = tmp_path / "out"
    predict.predict_cohort([path], out, weights=str(weights), device="cpu")
    old = (out / "restored.nii.gz").read_bytes()
    real_write = sitk.WriteImage

    def killed(image, name, *args, **kwargs):  # the process dies in the middle of writing
        Path(name).write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(predict.sitk, "WriteImage", killed)
    with pytest.raises(KeyboardInterrupt):
        predict.predict_cohort([path], out, weights=str(weights), device="cpu", overwrite=True)
    assert (out / "restored.nii.gz").read_bytes() == old
    assert not (out / "detection.json").exists()
    monkeypatch.setattr(predict.sitk, "WriteImage", real_write)
    capsys.readouterr()
    predict.predict_cohort([path], out, weights=str(weights), device="cpu")
    assert "already done" not in capsys.readouterr().out
    assert (out / "detection.json").exists()


def test_an_empty_restored_file_beside_its_marker_is_redone(tmp_path, weights, capsys):
    from VLDUNLib.predict import predict_cohort

    path = scan(tmp_path / "in")
    out = tmp_path / "out"
    predict_cohort([path], out, weights=str(weights), device="cpu")
    (out / "restored.nii.gz").write_bytes(b"")
    capsys.readouterr()
    predict_cohort([path], out, weights=str(weights), device="cpu")
    assert "restored.nii.gz is missing or incomplete" in capsys.readouterr().out
    assert sitk.ReadImage(str(out / "restored.nii.gz")).GetSize() == (18, 20, 4)


def test_detection_json_is_strict_json_and_never_half_written(tmp_path):
    from VLDUNLib.predict import write_json

    with pytest.raises(ValueError):
        write_json({"p": float("nan")}, tmp_path / "detection.json")
    assert not list(tmp_path.iterdir())


# --- predict: inputs ----------------------------------------------------------------------------------------

def test_truncated_nifti_inputs_are_refused(tmp_path, weights, capsys):
    folder = tmp_path / "in"
    plain = scan(folder, "plain.nii", shape=(4, 32, 32))
    plain.write_bytes(plain.read_bytes()[: 352 + int(0.6 * 4 * 32 * 32 * 4)])
    packed = scan(folder, "packed.nii.gz", shape=(4, 32, 32))
    packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    for path in (plain, packed):
        assert main(["predict", str(path), "--out", str(tmp_path / path.name), "--weights", str(weights),
                     "--device", "cpu"]) == 2
        assert "truncated" in capsys.readouterr().err
        assert not (tmp_path / path.name / "restored.nii.gz").exists()
    assert main(["predict", str(folder), "--out", str(tmp_path / "all"), "--weights", str(weights)]) == 2
    assert "nothing was run" in capsys.readouterr().err


def test_an_input_is_never_overwritten(tmp_path, weights, capsys):
    folder = tmp_path / "x"
    own = scan(folder, "restored.nii.gz")
    before = own.read_bytes()
    assert main(["predict", str(own), "--out", str(folder), "--weights", str(weights), "--device", "cpu"]) == 2
    assert "not a scan" in capsys.readouterr().err and own.read_bytes() == before
    # an output name that is a link to the input
    source = scan(tmp_path / "src", "brain.nii.gz")
    out = tmp_path / "linked"
    out.mkdir()
    (out / "restored.nii.gz").symlink_to(source)
    assert main(["predict", str(source), "--out", str(out), "--weights", str(weights), "--device", "cpu"]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


def test_the_tools_own_outputs_are_refused_as_inputs(tmp_path, weights, capsys):
    from VLDUNLib.predict import find_inputs, predict_cohort

    path = scan(tmp_path / "in")
    predict_cohort([path], tmp_path / "single", weights=str(weights), device="cpu")
    with pytest.raises(ValueError, match="output folder of vldun predict"):
        find_inputs([tmp_path / "single"])
    with pytest.raises(ValueError, match="output of vldun predict"):
        find_inputs([tmp_path / "single" / "segmentation.nii.gz"])


def test_tiny_volumes_are_refused(tmp_path, weights, capsys):
    path = scan(tmp_path, shape=(2, 2, 2))
    assert main(["predict", str(path), "--out", str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert "at least 16x16" in capsys.readouterr().err


def test_values_beyond_float32_are_refused(tmp_path, weights, capsys):
    array = np.full((4, 20, 18), 1e300)
    path = scan(tmp_path, "huge.nrrd", array=array)
    assert main(["predict", str(path), "--out", str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert "float32" in capsys.readouterr().err and not (tmp_path / "o" / "detection.json").exists()


def test_label_maps_are_refused_unless_allowed(tmp_path, weights, capsys):
    array = np.zeros((4, 20, 18), np.uint8)
    array[:, 5:10, 5:10] = 1
    array[:, 12:15, 3:9] = 2
    path = scan(tmp_path, "labels.nii.gz", array=array)
    args = ["predict", str(path), "--out", str(tmp_path / "o"), "--weights", str(weights), "--device", "cpu"]
    assert main(args) == 2
    assert "--allow-label-maps" in capsys.readouterr().err
    assert main([*args, "--allow-label-maps"]) == 0


def test_broken_and_looping_links_are_reported(tmp_path, weights):
    from VLDUNLib.predict import find_inputs

    folder = tmp_path / "in"
    scan(folder, "good.nii.gz")
    (folder / "gone.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    (folder / "loop.nii.gz").symlink_to(folder / "loop.nii.gz")
    with pytest.raises(ValueError, match="gone.nii.gz, loop.nii.gz"):
        find_inputs([folder])


# --- predict: resume ----------------------------------------------------------------------------------------

def test_a_rerun_with_other_settings_weights_or_input_redoes_the_case(tmp_path, weights, capsys):
    from VLDUNLib.predict import predict_cohort

    folder = tmp_path / "in"
    path = scan(folder, "a.nii.gz")
    scan(folder, "b.nii.gz", seed=1)
    out = tmp_path / "out"
    run = dict(weights=str(weights), device="cpu")
    assert predict_cohort([folder], out, **run) == 0
    capsys.readouterr()
    assert predict_cohort([folder], out, **run, batch_size=3) == 0
    assert capsys.readouterr().out.count("already done") == 2
    assert predict_cohort([folder], out, **run, mirror=True) == 0
    assert capsys.readouterr().out.count("different options") == 2
    assert json.loads((out / "a" / "detection.json").read_text())["produced_by"]["options"]["mirror"] is True
    scan(folder, "a.nii.gz", seed=5)  # the input replaced by another scan
    assert predict_cohort([folder], out, **run, mirror=True) == 0
    printed = capsys.readouterr().out
    assert "a.nii.gz: redoing it, as it was done with a different input_sha256" in printed
    assert printed.count("already done") == 1
    other = copy_model(weights, tmp_path / "other")
    _, info = read_model_info(other)
    info.ood_threshold = 0.7
    rewrite_info(other, info)
    assert predict_cohort([folder], out, weights=str(other), device="cpu", mirror=True) == 0
    assert capsys.readouterr().out.count("different config_sha256") == 2


# --- predict: errors ----------------------------------------------------------------------------------------

def test_an_unwritable_out_is_found_before_the_prediction(tmp_path, weights, capsys, monkeypatch):
    from VLDUNLib import predict

    path = scan(tmp_path)
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(predict, "VolumePredictor", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["predict", str(path), "--out", str(tmp_path / "a_file" / "out"), "--weights", str(weights)]) == 2
    assert "cannot be written" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage tensors", "pickle", "json list", "deep json"])
def test_bad_weights_are_one_line_and_a_traceback_only_with_debug(tmp_path, weights, capsys, damage):
    import pickle

    model = copy_model(weights, tmp_path / "model")
    if damage == "garbage tensors":
        model.write_bytes(b"\xff" * 64)
        weights_module.reseal(model)
    elif damage == "pickle":
        model.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    else:
        model.with_suffix(".json").write_text("[1, 2]" if damage == "json list" else "[" * 100000 + "]" * 100000)
    folder = tmp_path / "in"
    scan(folder, "a.nii.gz")
    scan(folder, "b.nii.gz")
    args = ["predict", str(folder), "--out", str(tmp_path / "out"), "--weights", str(model), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "tiny" in err
    assert not (tmp_path / "out" / "a").exists()
    with pytest.raises(WeightsError):
        main([*args, "--debug"])


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, weights, capsys, monkeypatch):
    from VLDUNLib import predict

    def boom(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(predict, "predict_cohort", boom)
    path = scan(tmp_path)
    assert main(["predict", str(path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "vldun predict: error: Permission denied: /some/file"
    with pytest.raises(PermissionError):
        main(["predict", str(path), "--out", str(tmp_path / "o"), "--debug"])


# --- workers ------------------------------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_workers_die_with_a_killed_parent(tmp_path, weights):
    folder = tmp_path / "in"
    for i in range(8):
        scan(folder, f"case_{i}.nii.gz", shape=(24, 96, 96), seed=i)
    code = (f"import sys; from VLDUNLib.cli import main; sys.exit(main(['predict', {str(folder)!r}, '--out', "
            f"{str(tmp_path / 'out')!r}, '--weights', {str(weights)!r}, '--device', 'cpu', '--workers', '2']))")
    env = {**os.environ, "PYTHONPATH": f"{VLDUN_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers := children_of(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) == 2, "the workers did not start"
        while not any((tmp_path / "out").glob("*/detection.json")) and time.monotonic() < deadline:
            time.sleep(0.2)  # the workers are busy with cases
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "workers outlived their killed parent"
    finally:
        for pid in [*workers, parent.pid]:  # never leave orphans behind, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    from VLDUNLib import predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_cohort", interrupted)
    assert main(["predict", str(scan(tmp_path)), "--out", str(tmp_path / "o")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_summary_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    from VLDUNLib import predict

    summary = tmp_path / "summary.csv"
    predict.write_summary(summary, [{"case": "a", "status": "done"}])
    before = summary.read_text()
    monkeypatch.setattr(predict.csv.DictWriter, "writerows", lambda self, rows: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        predict.write_summary(summary, [{"case": "b", "status": "done"}])
    assert summary.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["summary.csv"]
