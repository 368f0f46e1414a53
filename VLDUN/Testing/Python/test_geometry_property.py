"""Property-based: for any shape, dtype, spacing and direction, volume -> slices -> volume keeps geometry
and every voxel, through real MRML nodes and the real (tiny) network."""

from __future__ import annotations

import numpy as np
import slicer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from model_factory import tiny_predictor
from VLDUNLib import mrml
from VLDUNLib.geometry import slices_to_volume, volume_to_slices
from VLDUNLib.logic import VLDUNLogic

PREDICTOR = tiny_predictor()

shapes = st.tuples(st.integers(1, 6), st.integers(16, 24), st.integers(16, 24))
dtypes = st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
spacings = st.tuples(*[st.floats(0.3, 6.0) for _ in range(3)])
rotations = st.tuples(*[st.floats(-np.pi, np.pi) for _ in range(3)])


@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)), axis=st.integers(0, 2))
def test_slices_round_trip_is_exact(shape, axis):
    volume = np.arange(np.prod(shape)).reshape(shape)
    assert np.array_equal(slices_to_volume(volume_to_slices(volume, axis), axis), volume)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, dtype=dtypes, spacing=spacings, angles=rotations, seed=st.integers(0, 1000))
def test_volume_slices_volume_keeps_geometry_and_voxels(shape, dtype, spacing, angles, seed):
    scene = slicer.vtkMRMLScene()
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    high = min(info.max, 1000) if info else 1000.0
    array = rng.uniform(0, high, shape).astype(dtype)
    array.flat[0] = 0
    array.flat[-1] = high
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    slicer.util.updateVolumeFromArray(node, array)
    node.SetSpacing(*spacing)
    node.SetOrigin(*rng.uniform(-50, 50, 3))
    node.SetIJKToRASDirections(Rotation.from_euler("xyz", angles).as_matrix().tolist())
    before = mrml.volume_geometry(node)
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    try:
        VLDUNLogic(predictor=PREDICTOR).process(node, restored, segmentation, batch_size=4)
    except ValueError as error:
        assert "voxels per slice" in str(error)
        assert restored.GetImageData() is None and segmentation.GetSegmentation().GetNumberOfSegments() == 0
    else:
        assert mrml.volume_geometry(restored) == before
        assert slicer.util.arrayFromVolume(restored).shape == array.shape
    assert mrml.volume_geometry(node) == before
    assert np.array_equal(slicer.util.arrayFromVolume(node), array)
