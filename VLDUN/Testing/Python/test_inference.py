"""Whole-volume prediction: shapes and scale, determinism, batching, OOM fallback, cancel, override."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_factory import tiny_predictor
from VLDUNLib.inference import (
    Cancelled,
    DeviceOutOfMemory,
    ScanPrior,
    prior_slice_indices,
    prior_tiles,
    resolve_device,
    tile_starts,
)
from VLDUNLib.intensity import fit_window
from VLDUNLib.letterbox import resize_images


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :20]
    disk = ((yy - 12) ** 2 + (xx - 10) ** 2 < 40).astype(np.float32)
    return (300.0 * disk[None] + 20.0 * rng.standard_normal((5, 24, 20))).astype(np.int16)


def test_outputs_match_the_input_shape_scale_and_classes(volume):
    prediction = tiny_predictor().predict(volume, batch_size=2)
    assert prediction.restored.shape == volume.shape and prediction.restored.dtype == np.float32
    assert prediction.labels.shape == volume.shape and prediction.labels.dtype == np.uint8
    assert abs(np.median(prediction.restored) - np.median(volume)) < 0.2 * np.ptp(volume)
    assert set(np.unique(prediction.labels)) <= {0, 1, 2, 3}
    assert [s.key for s in prediction.detection.segments] == ["ACDC/RV", "ACDC/MYO", "ACDC/LV"]


def test_same_input_gives_bit_identical_outputs_twice(volume):
    predictor = tiny_predictor()
    first, second = predictor.predict(volume), predictor.predict(volume)
    assert np.array_equal(first.restored, second.restored) and np.array_equal(first.labels, second.labels)


def test_result_does_not_depend_on_the_batch_size(volume):
    predictor = tiny_predictor()
    small, large = predictor.predict(volume, batch_size=1), predictor.predict(volume, batch_size=8)
    np.testing.assert_allclose(small.restored, large.restored, rtol=1e-4, atol=1e-3)
    assert (small.labels == large.labels).mean() > 0.999


def test_out_of_memory_halves_the_batch_and_gives_the_same_result(volume, monkeypatch):
    predictor = tiny_predictor()
    expected = predictor.predict(volume, batch_size=2)
    forward = type(predictor.model).forward
    sizes = []

    def limited(self, degraded, prior=None, **heads):
        sizes.append(len(degraded))
        if len(degraded) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, degraded, prior, **heads)

    monkeypatch.setattr(type(predictor.model), "forward", limited)
    result = predictor.predict(volume, batch_size=8)
    assert sizes[:2] == [5, 4] and max(sizes[2:]) <= 2
    np.testing.assert_allclose(result.restored, expected.restored, rtol=1e-5, atol=1e-4)


def test_out_of_memory_at_batch_one_names_the_cpu_fix(volume, monkeypatch):
    predictor = tiny_predictor()

    def always(self, degraded, prior=None, **heads):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(predictor.model), "forward", always)
    with pytest.raises(DeviceOutOfMemory, match="cpu"):
        predictor.predict(volume, batch_size=2)


def test_out_of_memory_in_the_prior_names_the_cpu_fix(volume, monkeypatch):
    """On an H100 capped at 43 MiB the prior ran out first, as a bare CUDA error the module could not offer CPU for."""
    predictor = tiny_predictor()

    def no_memory(self, degraded):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(predictor.model), "compute_prior", no_memory)
    with pytest.raises(DeviceOutOfMemory, match="prior; run on device 'cpu'"):
        predictor.predict(volume)


def test_out_of_memory_while_loading_the_model_names_the_cpu_fix(monkeypatch):
    from VLDUNLib.inference import VolumePredictor

    predictor = tiny_predictor()
    model, info = predictor.model, predictor.info

    def no_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(model), "to", no_memory)
    with pytest.raises(DeviceOutOfMemory, match="loading the model; run on device 'cpu'"):
        VolumePredictor(device="cpu", model=(model, info))


def test_cancel_stops_between_batches(volume):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        tiny_predictor().predict(volume, batch_size=2, should_cancel=should_cancel)
    assert len(calls) == 2


def test_progress_reports_every_batch(volume):
    seen = []
    tiny_predictor().predict(volume, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_degradation_override_and_ood_flag(volume):
    prediction = tiny_predictor(ood_threshold=1.01).predict(volume, degradation_override="motion")
    assert prediction.detection.degradation == "motion" and prediction.detection.degradation_probability > 0.99
    assert prediction.detection.out_of_distribution
    with pytest.raises(ValueError, match="Unknown degradation"):
        tiny_predictor().predict(volume, degradation_override="rain")


def test_model_without_prior_still_predicts(volume):
    prediction = tiny_predictor(ablation="no_clip").predict(volume)
    assert prediction.detection.out_of_distribution and prediction.restored.shape == volume.shape


def test_prior_slices_are_central_and_few():
    assert prior_slice_indices(3) == [0, 1, 2]
    picked = prior_slice_indices(100)
    assert len(picked) == 5 and min(picked) >= 19 and max(picked) <= 80


def test_tiles_reach_both_edges_and_are_capped():
    assert tile_starts(100, 128) == [0]
    assert tile_starts(256, 128) == [0, 128]
    assert tile_starts(441, 128) == [0, 104, 209, 313]
    many = tile_starts(1024, 128)
    assert len(many) == 4 and many[0] == 0 and many[-1] == 1024 - 128


def test_the_prior_reads_tiles_at_the_scans_own_pixel_scale():
    """Large slices are cut, not shrunk: every tile is an exact crop, so noise and blur keep their pixel size."""
    slices = torch.rand(2, 1, 256, 192)
    tiles = prior_tiles(slices, 128)
    assert tiles.shape == (8, 1, 128, 128)
    assert torch.equal(tiles[0], slices[0, :, :128, :128])
    assert torch.equal(tiles[7], slices[1, :, 128:, 64:])


def test_small_slices_reach_the_prior_letterboxed_as_in_training():
    slices = torch.rand(2, 1, 24, 20)
    assert torch.equal(prior_tiles(slices, 48), resize_images(slices, 48))


@pytest.mark.parametrize(("train_size", "seen"), [(None, [(5, 1, 24, 20)]), (48, [(5, 1, 48, 48)]),
                                                  (12, [(20, 1, 12, 12), (5, 1, 12, 12)])])
def test_the_prior_reads_each_geometry_once_per_volume(volume, train_size, seen):
    """Tiles when slices exceed the training size, plus the letterboxed slices for the segmentation pass;
    one letterboxed set when the slices are smaller (both passes would read the same)."""
    predictor = tiny_predictor()
    predictor.info.train_size = train_size
    shapes = []
    predictor.model.prior.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    detection = predictor.predict(volume).detection
    assert shapes == seen
    assert sum(detection.degradation_probabilities.values()) == pytest.approx(1.0)


def test_each_pass_reads_the_prior_of_the_image_it_sees(volume):
    """Restoration at the scan's size gets the tiles' prior; segmentation at the training scale gets the prior
    of the letterboxed slices it reads, as in training."""
    predictor = tiny_predictor()
    predictor.info.train_size = 12
    slices = predictor._slices(volume, fit_window(volume), prior_slice_indices(len(volume)))
    scan = predictor.scan_prior(slices)
    seen = {}

    def record(module, args):
        seen[args[0].shape[-1]] = args[1].tokens[0]

    predictor.model.register_forward_pre_hook(record)
    predictor.predict(volume)
    assert torch.equal(seen[20], scan.native.tokens[0]) and torch.equal(seen[12], scan.scaled.tokens[0])
    assert not torch.equal(scan.native.tokens, scan.scaled.tokens)


def test_unavailable_devices_are_refused_with_the_fix():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="choose"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="auto"):
            resolve_device("cuda")



@pytest.mark.parametrize(("train_size", "passes"), [(None, [(24, 20)]), (24, [(24, 20)]),
                                                    (12, [(24, 20), (12, 12)]), (48, [(24, 20), (48, 48)])])
def test_segmentation_runs_at_the_training_scale(volume, train_size, passes):
    """Restoration keeps every pixel; labels come from slices scaled and padded as in training, then resized."""
    predictor = tiny_predictor()
    predictor.info.train_size = train_size
    sizes = []
    predictor.model.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    prediction = predictor.predict(volume, batch_size=5)
    assert sizes == passes
    assert prediction.labels.shape == prediction.restored.shape == volume.shape


def test_training_scale_labels_follow_the_small_pass(volume):
    """Labels are the small pass's logits brought back to the slice: a class filling its right half fills
    the right half of the labels (LV is label 3 of the tiny model's ACDC classes)."""
    predictor = tiny_predictor()
    predictor.info.train_size = 12

    def right_half_is_lv(module, args, out):
        if args[0].shape[-1] == 12:
            out.seg_logits = torch.zeros_like(out.seg_logits)
            out.seg_logits[:, 3, :, 6:] = 10.0
        return out

    predictor.model.register_forward_hook(right_half_is_lv)
    labels = predictor.predict(volume).labels
    assert (labels[:, :, 12:] == 3).all() and (labels[:, :, :8] == 0).all()


@pytest.mark.parametrize("architecture", ["vldun"])
def test_a_skipped_head_leaves_the_other_output_unchanged(architecture):
    model = tiny_predictor(architecture=architecture).model
    x = torch.rand(2, 1, 24, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        restored_only, seg_only = model(x, full.prior, segment=False), model(x, full.prior, restore=False)
    assert restored_only.seg_logits is None and seg_only.restored is None
    assert torch.equal(restored_only.restored, full.restored) and torch.equal(seg_only.seg_logits, full.seg_logits)


@pytest.mark.parametrize(("ablation", "calls"), [("full", [(20, {"segment": False}), (12, {"restore": False})]),
                                                 ("no_rec_head", [(12, {"restore": False})])])
def test_each_pass_computes_only_the_head_it_keeps(ablation, calls):
    """Same outputs as two full passes (native restoration, training-scale segmentation), fewer heads run."""
    from VLDUNLib.letterbox import content_box

    predictor = tiny_predictor(ablation=ablation)
    predictor.info.train_size = 12
    model = predictor.model
    batch = torch.rand(3, 1, 24, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = model.compute_prior(batch).pooled().expand(3)
        prior = ScanPrior(pooled, pooled)
        top, left, rows, cols = content_box(24, 20, 12)
        small = model(resize_images(batch, 12), pooled).seg_logits[..., top : top + rows, left : left + cols]
        expected_logits = torch.nn.functional.interpolate(small, size=(24, 20), mode="bilinear", align_corners=False)
        expected_restored = model(batch, pooled).restored
        seen = []
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0].shape[-1], kwargs)), with_kwargs=True)
        restored, logits = predictor.forward_slices(batch, prior)
    assert seen == calls
    assert torch.equal(logits, expected_logits)
    assert (restored is None) if ablation == "no_rec_head" else torch.equal(restored, expected_restored)


def test_large_slices_are_batched_by_pixels(monkeypatch):
    """A big scan is streamed in batches of at most MAX_BATCH_PIXELS pixels, whatever batch size was asked."""
    from VLDUNLib import inference

    monkeypatch.setattr(inference, "MAX_BATCH_PIXELS", 2 * 32 * 32)
    volume = np.random.default_rng(0).normal(100, 20, (5, 32, 32)).astype(np.float32)
    done = []
    tiny_predictor().predict(volume, batch_size=8, progress=lambda d, t: done.append(d))
    assert done == [2, 4, 5]


def test_mirroring_averages_the_flips_and_undoes_each(volume):
    """A model that marks the left quarter of whatever it reads as LV (label 3): unmirrored, the labels are
    LV on the left only; mirrored, two of the four flips put it on the right, brought back to the slice."""
    plain, mirrored = tiny_predictor(), tiny_predictor()
    mirrored.mirror = True

    def left_quarter_is_lv(module, args, out):
        if out.seg_logits is not None:
            out.seg_logits = torch.zeros_like(out.seg_logits)
            out.seg_logits[:, 3, :, :5] = 10.0
        return out

    for predictor in (plain, mirrored):
        predictor.model.register_forward_hook(left_quarter_is_lv)
    once, averaged = plain.predict(volume).labels, mirrored.predict(volume).labels
    assert (once[:, :, :5] == 3).all() and (once[:, :, 5:] == 0).all()
    assert (averaged[:, :, :5] == 3).all() and (averaged[:, :, -5:] == 3).all() and (averaged[:, :, 5:-5] == 0).all()
    np.testing.assert_array_equal(plain.predict(volume).restored, mirrored.predict(volume).restored)


@pytest.mark.parametrize("train_size", [None, 12])
def test_mirrored_scores_are_probabilities_and_mirror_with_the_input(volume, train_size):
    predictor = tiny_predictor()
    predictor.mirror = True
    predictor.info.train_size = train_size
    batch = torch.rand(2, 1, 24, 20)
    prior = predictor.scan_prior(batch)
    _, scores = predictor.forward_slices(batch, prior.expand(2))
    _, flipped = predictor.forward_slices(batch.flip(-1), prior.expand(2))
    torch.testing.assert_close(scores.sum(1), torch.ones(2, 24, 20), atol=1e-5, rtol=0)
    if train_size is None:
        torch.testing.assert_close(flipped, scores.flip(-1), atol=1e-5, rtol=0)


def identity_restoration(predictor):
    """The predictor with its restoration residual zeroed: the network returns its input unchanged."""
    torch.nn.init.zeros_(predictor.model.rec_head.refine[-1].weight)
    torch.nn.init.zeros_(predictor.model.rec_head.refine[-1].bias)
    return predictor


def test_ct_keeps_air_metal_and_bone_outside_the_window():
    rng = np.random.default_rng(1)
    volume = (40.0 + 10.0 * rng.standard_normal((4, 32, 32))).astype(np.float32)
    volume[:, :8] = -1024.0
    volume[:, 12:14, 12:14] = 3000.0
    volume[:, 20:22, 5:9] = 1500.0
    assert fit_window(volume).kind == "ct_hu"
    restored = tiny_predictor().predict(volume).restored
    outside = (volume < -1000) | (volume > 1000)
    np.testing.assert_array_equal(restored[outside], volume[outside])
    assert restored.max() == 3000.0 and restored.min() == -1024.0


def test_mri_keeps_its_maximum(volume):
    mri = volume.astype(np.float32)
    mri[2, 12, 10] = 9.31 * mri.max()
    restored = tiny_predictor().predict(mri).restored
    assert restored.max() == mri.max() and restored[2, 12, 10] == mri[2, 12, 10]


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_a_volume_the_network_leaves_unchanged_comes_back_bit_identical(volume, dtype):
    source = volume.astype(dtype)
    source[0, 0, 0] = 30000 if dtype == np.int16 else 1e6
    restored = identity_restoration(tiny_predictor()).predict(source).restored
    np.testing.assert_array_equal(restored, source.astype(np.float32))


def with_ood_at(predictor, volume, distance: float):
    """The predictor with one reference scan at cosine distance `distance` from `volume`'s embedding, threshold 0.1."""
    from VLDUNLib.ood import NearestNeighbourOOD, unit_rows

    window = fit_window(volume)
    embedding = predictor.slice_prior(predictor._slices(volume, window, prior_slice_indices(len(volume)))).embedding
    e = unit_rows(embedding[0].double().numpy())
    other = np.random.default_rng(0).normal(size=e.shape)
    other = unit_rows(other - (other @ e) * e)  # orthogonal to e
    cosine = 1.0 - distance
    reference = cosine * e + np.sqrt(1.0 - cosine**2) * other
    predictor.info.ood = NearestNeighbourOOD(reference[None], 0.1)
    return predictor


def test_the_detection_is_readable_and_keeps_the_key_for_machines(volume):
    detection = tiny_predictor().predict(volume).detection
    assert detection.modality == "MRI · heart, cine" and detection.modality_key == "ACDC/MRI"
    assert detection.task == "heart" and detection.segmentation_note == ""


def test_the_unknown_scan_score_is_the_distance_to_the_nearest_training_scan(volume):
    near = with_ood_at(tiny_predictor(), volume, 0.05).predict(volume).detection
    far = with_ood_at(tiny_predictor(), volume, 0.5).predict(volume).detection
    assert near.ood_score == pytest.approx(0.05, abs=1e-5) and not near.out_of_distribution
    assert far.ood_score == pytest.approx(0.5, abs=1e-5) and far.out_of_distribution


def test_auto_leaves_an_unknown_scan_unsegmented_and_says_how_to_force_a_task(volume):
    prediction = with_ood_at(tiny_predictor(), volume, 0.5).predict(volume)
    assert prediction.detection.segments == [] and prediction.detection.task is None
    assert not prediction.labels.any() and prediction.restored.shape == volume.shape
    assert "unlike the training data" in prediction.detection.segmentation_note
    assert "--task heart" in prediction.detection.segmentation_note


def test_a_named_task_segments_even_an_unknown_scan(volume):
    predictor = with_ood_at(tiny_predictor(), volume, 0.5)
    auto_free = tiny_predictor().predict(volume)
    forced = predictor.predict(volume, task="heart")
    assert forced.detection.out_of_distribution and forced.detection.task == "heart"
    assert [s.key for s in forced.detection.segments] == ["ACDC/RV", "ACDC/MYO", "ACDC/LV"]
    np.testing.assert_array_equal(forced.labels, auto_free.labels)


def test_tasks_lists_the_choices_and_unknown_ones_are_refused(volume):
    predictor = tiny_predictor()
    assert predictor.tasks() == {"heart": "Heart: ventricles and myocardium"}
    with pytest.raises(ValueError, match="Unknown task 'liver'.*heart"):
        predictor.predict(volume, task="liver")


def test_a_model_with_a_none_class_says_no_degradation_detected(volume):
    predictor = tiny_predictor(degradations=("noise", "blur", "none"))
    detection = predictor.predict(volume, degradation_override="none").detection
    assert detection.degradation == "no degradation detected" and set(detection.degradation_probabilities) == {
        "noise", "blur", "none"}
    assert tiny_predictor(degradations=("noise", "none")).predict(volume, degradation_override="noise").detection.degradation == "noise"
