"""Reading the four real nnU-Net datasets, reporting every problem of broken ones, splits, classes and slices."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from model_factory import DATA
from vldun_lab.datasets import (
    Case,
    DatasetError,
    DatasetInfo,
    SliceRef,
    load_case,
    read_dataset,
    read_datasets,
    validate_dataset,
)
from vldun_lab.labels import LabelSpace, label_space, modality_classes
from vldun_lab.slices import SliceDataset, balanced_sampler
from vldun_lab.splits import patient_id, split_cases
from VLDUNLib.config import DEFAULT_MODALITIES
from VLDUNLib.letterbox import resize_slices

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data beside the checkout")
COVID = DATA / "Dataset003_COVID19CT"


FOUR = ("Dataset001_ACDC", "Dataset002_BraTS2015", "Dataset003_COVID19CT", "Dataset004_AbdomenCT")
"""The datasets the shipped weights were trained on."""


@pytest.fixture(scope="module")
def infos() -> list[DatasetInfo]:
    return read_datasets([DATA / name for name in FOUR])


def test_the_data_folder_reads_whole_including_brats2018() -> None:
    summary = {i.name: (i.short_name, len(i.cases), i.imaging, sorted(i.channels.values())) for i in read_datasets(DATA)}
    assert set(FOUR) < set(summary)
    assert summary["Dataset007_BraTS2018"] == ("BraTS2018", 7, "MRI", ["FLAIR", "T1"])


@pytest.fixture(scope="module")
def by_name(infos: list[DatasetInfo]) -> dict[str, DatasetInfo]:
    return {info.short_name: info for info in infos}


def case(info: DatasetInfo, case_id: str) -> Case:
    return next(c for c in info.cases if c.case_id == case_id)


# --------------------------------------------------------------------------------------------- real datasets


def test_reads_all_four_real_datasets(infos: list[DatasetInfo]) -> None:
    summary = [(i.name, i.short_name, len(i.cases), i.imaging, i.spacing_known) for i in infos]
    assert summary == [
        ("Dataset001_ACDC", "ACDC", 160, "MRI", False),
        ("Dataset002_BraTS2015", "BraTS2015", 4, "MRI", True),
        ("Dataset003_COVID19CT", "COVID19CT", 50, "CT", False),
        ("Dataset004_AbdomenCT", "AbdomenCT", 1, "CT", True),
    ]
    assert [i.modality for i in infos] == ["cardiac cine MRI", "brain MRI", "lung CT", "abdominal CT"]
    assert [i.channels for i in infos] == [{0: "MRI"}, {0: "T1c", 1: "FLAIR"}, {0: "CT"}, {0: "CT"}]
    assert infos[1].labels == {"background": 0, "necrosis": 1, "edema": 2, "non_enhancing": 3, "enhancing": 4}
    for info in infos:
        assert len({c.case_id for c in info.cases}) == len(info.cases)
        for c in info.cases:
            assert c.dataset == info.short_name and len(c.images) == len(info.channels)
            assert all(p.is_file() for p in c.images) and c.label is not None and c.label.is_file()
    assert read_datasets([DATA / "Dataset004_AbdomenCT"])[0].cases == infos[3].cases


def test_load_case_shapes_and_types(by_name: dict[str, DatasetInfo]) -> None:
    image, label = load_case(case(by_name["ACDC"], "patient001_frame01"))
    assert image.shape == label.shape == (10, 216, 256)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2, 3} and 0 <= image.min() and image.max() <= 1
    image, label = load_case(case(by_name["COVID19CT"], "covid_000"))
    assert image.shape == label.shape == (1, 273, 369), "a 2-D case is one slice"
    image, label = load_case(by_name["AbdomenCT"].cases[0])
    assert image.shape == (30, 101, 122) and image.min() == -1100, "Hounsfield units are kept"
    with pytest.raises(ValueError, match="channels 0..0"):
        load_case(by_name["AbdomenCT"].cases[0], channel=1)


def test_multichannel_case_loads_each_channel(by_name: dict[str, DatasetInfo]) -> None:
    brats = by_name["BraTS2015"].cases[0]
    t1c, label = load_case(brats, 0)
    flair, label_again = load_case(brats, 1)
    assert t1c.shape == flair.shape == label.shape == (155, 240, 240)
    assert not np.array_equal(t1c, flair) and np.array_equal(label, label_again)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4}


def test_values_of_real_small_datasets_validate(by_name: dict[str, DatasetInfo]) -> None:
    validate_dataset(by_name["AbdomenCT"])
    validate_dataset(by_name["COVID19CT"], check_values=False)


def test_modality_classes_match_the_shipped_config(infos: list[DatasetInfo]) -> None:
    classes = modality_classes(infos)
    assert tuple(m.key for m in classes) == DEFAULT_MODALITIES
    assert [m.imaging for m in classes] == ["MRI", "MRI", "MRI", "CT", "CT"]
    assert classes[2].display == "MRI · brain, FLAIR" and classes[0].display == "MRI · heart, cine"


def test_readable_modalities_come_from_dataset_json_and_match_the_shipped_defaults(infos: list[DatasetInfo]) -> None:
    from vldun_lab.labels import modality_names
    from VLDUNLib.tasks import DEFAULT_MODALITY_NAMES

    assert modality_names(infos) == DEFAULT_MODALITY_NAMES
    brats2018 = read_dataset(DATA / "Dataset007_BraTS2018", require_labels=False)
    assert modality_names([brats2018]) == {"BraTS2018/FLAIR": "MRI · brain, FLAIR", "BraTS2018/T1": "MRI · brain, T1"}


def test_the_label_space_gives_the_four_tasks(infos: list[DatasetInfo]) -> None:
    tasks = label_space(infos).tasks()
    assert {k: t.classes for k, t in tasks.items()} == {
        "heart": (1, 2, 3), "brain_tumour": (4, 5, 6, 7), "lung_infection": (8,), "abdominal_organs": (9, 10, 11)}


# ------------------------------------------------------------------------------------------------ label space


def test_label_space_over_all_datasets(infos: list[DatasetInfo]) -> None:
    space = label_space(infos)
    assert space.keys[:4] == ("background", "ACDC/RV", "ACDC/MYO", "ACDC/LV")
    brats = ("BraTS2015/necrosis", "BraTS2015/edema", "BraTS2015/non_enhancing", "BraTS2015/enhancing")
    assert space.keys[4:8] == brats and space.keys[8:] == (
        "COVID19CT/infection", "AbdomenCT/liver", "AbdomenCT/spleen", "AbdomenCT/kidney"
    )
    assert space.dataset_classes == {
        "ACDC": (1, 2, 3), "BraTS2015": (4, 5, 6, 7), "COVID19CT": (8,), "AbdomenCT": (9, 10, 11)
    }
    assert LabelSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    assert space.class_mask("COVID19CT").nonzero().flatten().tolist() == [0, 8]


def test_label_space_round_trips_real_labels(infos: list[DatasetInfo], by_name: dict[str, DatasetInfo]) -> None:
    space = label_space(infos)
    _, local = load_case(by_name["AbdomenCT"].cases[0])
    global_labels = space.to_global("AbdomenCT", local)
    assert global_labels.dtype == np.int64
    assert set(np.unique(global_labels)) == {0, 9, 10, 11}
    np.testing.assert_array_equal(space.to_local("AbdomenCT", global_labels), local)
    tensor = space.to_global("AbdomenCT", torch.from_numpy(local))
    assert isinstance(tensor, torch.Tensor) and torch.equal(tensor, torch.from_numpy(global_labels))
    assert torch.equal(space.to_local("AbdomenCT", tensor), torch.from_numpy(local).long())


def test_label_space_rejects_foreign_values(infos: list[DatasetInfo]) -> None:
    space = label_space(infos)
    with pytest.raises(ValueError, match=r"values \[2\]"):
        space.to_global("COVID19CT", np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"values \[1\].*class_mask"):
        space.to_local("COVID19CT", np.array([0, 8, 1]))
    with pytest.raises(ValueError, match="Unknown dataset"):
        space.to_global("LiTS", np.array([0]))
    with pytest.raises(ValueError, match="background"):
        LabelSpace(("liver",), {})
    with pytest.raises(ValueError, match="unique"):
        label_space([infos[0], infos[0]])


# ---------------------------------------------------------------------------------------------------- splits


def test_patient_grouping() -> None:
    assert patient_id("patient007_frame12") == "patient007"
    assert patient_id("brats_2013_pat0001_1") == "brats_2013_pat0001_1"


@pytest.mark.parametrize("name", ["ACDC", "BraTS2015", "COVID19CT"])
def test_split_is_seeded_disjoint_and_keeps_patients_together(by_name: dict[str, DatasetInfo], name: str) -> None:
    info = by_name[name]
    train, val = split_cases(info, 0.2, seed=0)
    assert (train, val) == split_cases(info, 0.2, seed=0)
    assert val and train
    assert {c.case_id for c in train}.isdisjoint(c.case_id for c in val)
    assert sorted(c.case_id for c in train + val) == sorted(c.case_id for c in info.cases)
    assert {patient_id(c.case_id) for c in train}.isdisjoint(patient_id(c.case_id) for c in val)
    expected = {"ACDC": 32, "BraTS2015": 1, "COVID19CT": 10}[name]
    assert len(val) == expected
    assert len(split_cases(info, 0.01)[1]) == (2 if name == "ACDC" else 1), "at least one patient validates"


def test_split_changes_with_the_seed(by_name: dict[str, DatasetInfo]) -> None:
    assert split_cases(by_name["ACDC"], seed=0)[1] != split_cases(by_name["ACDC"], seed=1)[1]


def test_single_case_dataset_is_split_by_slices(by_name: dict[str, DatasetInfo]) -> None:
    train, val = split_cases(by_name["AbdomenCT"], 0.2, seed=0)
    assert all(isinstance(r, SliceRef) for r in train + val) and len(val) == 1
    covered = sorted(s for r in train + val for s in range(r.start, r.stop))
    assert covered == list(range(30)), "every slice in exactly one part"
    assert val[0].stop - val[0].start == 6
    image, label = load_case(val[0])
    assert image.shape == (6, 101, 122) and label.shape == (6, 101, 122)
    assert (train, val) == split_cases(by_name["AbdomenCT"], 0.2, seed=0)


def test_split_rejects_bad_fraction(by_name: dict[str, DatasetInfo]) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_cases(by_name["ACDC"], 1.0)


# ------------------------------------------------------------------------------------------- training slices


@pytest.fixture(scope="module")
def slices(infos: list[DatasetInfo], by_name: dict[str, DatasetInfo]) -> SliceDataset:
    cases = [
        case(by_name["ACDC"], "patient001_frame01"),
        case(by_name["ACDC"], "patient002_frame01"),
        by_name["BraTS2015"].cases[0],
        *by_name["COVID19CT"].cases[:3],
        *split_cases(by_name["AbdomenCT"])[1],
    ]
    return SliceDataset(infos, cases, patch=64)


def test_slice_items_have_the_training_contract(slices: SliceDataset) -> None:
    space = slices.label_space
    for index in range(0, len(slices), 17):
        item = slices[index]
        assert item["clean"].shape == (1, 64, 64) and item["clean"].dtype == torch.float32
        assert 0 <= item["clean"].min() and item["clean"].max() <= 1 and item["clean"].max() > 0
        assert item["label"].shape == (64, 64) and item["label"].dtype == torch.int64
        dataset = slices.datasets[int(item["dataset"])]
        assert torch.equal(item["class_mask"], space.class_mask(dataset))
        assert item["class_mask"][item["label"].unique()].all(), "labels only of the sample's own dataset"
        assert slices.modalities[int(item["modality"])].key.startswith(dataset + "/")


def test_slices_per_dataset_and_channel(slices: SliceDataset) -> None:
    keys = [m.key for m in slices.modalities]
    counts = dict(zip(keys, torch.bincount(slices.sample_modality, minlength=len(keys)).tolist()))
    assert counts["ACDC/MRI"] == 10 + 10, "patients 001 and 002 have 10 slices each"
    assert counts["COVID19CT/CT"] == 3 and counts["AbdomenCT/CT"] == 6
    assert counts["BraTS2015/T1c"] == counts["BraTS2015/FLAIR"] > 50, "one sample per channel"
    assert slices.skipped > 0 and counts["BraTS2015/T1c"] + slices.skipped // 2 == 155, "empty brain slices skipped"


def test_native_slices_keep_the_scan_size_of_every_sample(infos: list[DatasetInfo], by_name: dict[str, DatasetInfo],
                                                          slices: SliceDataset) -> None:
    covid = by_name["COVID19CT"].cases[:3]
    native = SliceDataset(infos, covid, patch=64, native=True)
    assert torch.equal(native.images, SliceDataset(infos, covid, patch=64).images), "patch-size slices unchanged"
    for index, case in enumerate(covid):
        image, _ = load_case(case)
        own = native.native_slice(index)
        assert own.shape == (1, 1, *image.shape[1:]) and own.dtype == torch.float32
        expected = resize_slices(own[0].numpy(), 64, "image")
        assert np.abs(expected - native.images[index].numpy()).max() <= 1 / 510 + 1e-6, "the same slice, 8-bit"
    drawn = native.native_indices(50, 350, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {i for i, s in enumerate(native.native) if max(s.shape) > 350}
    assert len(native.native_indices(5, 10_000)) == 0
    with pytest.raises(ValueError, match="native=True"):
        slices.native_indices(1, 64)


def test_resizing_keeps_aspect_and_label_values() -> None:
    image = np.random.default_rng(0).random((2, 30, 60), dtype=np.float32)
    labels = np.zeros((2, 30, 60), dtype=np.uint8)
    labels[:, 10:20, 20:40] = 3
    patched, patched_labels = resize_slices(image, 64, "image"), resize_slices(labels, 64, "label")
    assert patched.shape == patched_labels.shape == (2, 64, 64)
    assert patched.dtype == np.float32 and patched_labels.dtype == np.uint8
    assert np.all(patched[:, :16] == 0) and np.all(patched[:, 48:] == 0), "32 rows centred"
    assert set(np.unique(patched_labels)) == {0, 3}
    reference = F.interpolate(torch.from_numpy(labels)[:, None].float(), size=(32, 64), mode="nearest-exact")
    np.testing.assert_array_equal(patched_labels[:, 16:48], reference[:, 0].numpy())
    upscaled = F.interpolate(torch.from_numpy(image)[:, None], size=(32, 64), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(patched[:, 16:48], upscaled[:, 0].numpy(), atol=1e-6)
    shrunk = resize_slices(np.ones((1, 300, 150), dtype=np.float32), 64, "image")
    assert np.all(shrunk[0, :, 16:48] == 1) and np.all(shrunk[0, :, :16] == 0), "area shrink, 32 columns centred"
    with pytest.raises(ValueError, match="kind"):
        resize_slices(labels, 64, "mask")  # type: ignore[arg-type]


def test_augmentation_is_seeded_and_moves_image_and_label_together(slices: SliceDataset) -> None:
    augmenting = SliceDataset.__new__(SliceDataset)
    augmenting.__dict__.update(slices.__dict__, augment=True)
    index = int(torch.nonzero(slices.sample_dataset == slices.datasets.index("ACDC"))[3])
    plain = slices.item(index)
    first = augmenting.item(index, torch.Generator().manual_seed(5))
    again = augmenting.item(index, torch.Generator().manual_seed(5))
    assert torch.equal(first["clean"], again["clean"]) and torch.equal(first["label"], again["label"])
    variants = [
        (plain["clean"].flip(f).rot90(k, (-2, -1)), plain["label"].flip(f).rot90(k, (-2, -1)))
        for f in ([], [-1], [-2], [-2, -1])
        for k in range(4)
    ]
    assert any(torch.equal(first["clean"], x) and torch.equal(first["label"], y) for x, y in variants)
    assert torch.equal(slices.item(index)["clean"], plain["clean"]), "stored data untouched"


def test_balanced_sampler_draws_datasets_equally(slices: SliceDataset) -> None:
    indices = torch.tensor(list(balanced_sampler(slices, 8000, seed=3)))
    assert torch.equal(indices, torch.tensor(list(balanced_sampler(slices, 8000, seed=3))))
    shares = torch.bincount(slices.sample_dataset[indices], minlength=4).double() / 8000
    torch.testing.assert_close(shares, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03, rtol=0)
    raw_share = (slices.sample_dataset == slices.datasets.index("COVID19CT")).double().mean()
    assert raw_share < 0.02, "without balancing COVID would hardly ever be drawn"
    drawn = slices.balanced_indices(4000, torch.Generator().manual_seed(0))
    assert drawn.shape == (4000,) and drawn.max() < len(slices)
    loader = torch.utils.data.DataLoader(slices, batch_size=4, sampler=balanced_sampler(slices, 8, seed=0))
    batch = next(iter(loader))
    assert batch["clean"].shape == (4, 1, 64, 64) and batch["modality"].shape == batch["dataset"].shape == (4,)
    assert batch["class_mask"].shape == (4, 12) and batch["label"].dtype == torch.int64


def test_dataset_weights_set_each_datasets_share_of_the_draws(slices: SliceDataset) -> None:
    weights = {"COVID19CT": 3.0, "ACDC": 0.0}
    drawn = slices.balanced_indices(8000, torch.Generator().manual_seed(1), weights)
    shares = torch.bincount(slices.sample_dataset[drawn], minlength=4).double() / 8000
    expected = torch.tensor([3.0 if n == "COVID19CT" else 0.0 if n == "ACDC" else 1.0 for n in slices.datasets]) / 5
    torch.testing.assert_close(shares, expected.double(), atol=0.03, rtol=0)
    assert shares[slices.datasets.index("ACDC")] == 0, "a weight of 0 leaves the dataset out"
    with pytest.raises(ValueError, match=r"\['COVID'\].*COVID19CT"):
        slices.balanced_indices(4, weights={"COVID": 2.0})
    with pytest.raises(ValueError, match="0 or more"):
        slices.sample_weights({"ACDC": -1.0})
    with pytest.raises(ValueError, match="at least one above 0"):
        slices.sample_weights(dict.fromkeys(slices.datasets, 0.0))


def test_dataset_weights_reach_the_native_tiles(infos: list[DatasetInfo], by_name: dict[str, DatasetInfo]) -> None:
    native = SliceDataset(infos, by_name["COVID19CT"].cases[:2] + by_name["ACDC"].cases[:1], patch=64, native=True)
    covid = native.datasets.index("COVID19CT")
    only_acdc = native.native_indices(40, 100, torch.Generator().manual_seed(0), {"COVID19CT": 0.0})
    assert len(only_acdc) == 40 and (native.sample_dataset[only_acdc] != covid).all()
    assert len(native.native_indices(5, 100, weights={"COVID19CT": 0.0, "ACDC": 0.0, "BraTS2015": 1.0})) == 0


# -------------------------------------------------------------------------------------------- broken datasets


def make_covid_copy(root: Path, case_ids: list[str], ending: str = ".nii.gz") -> Path:
    """A copy of some COVID19CT cases in tmp (written in another format when ``ending`` differs)."""
    meta = json.loads((COVID / "dataset.json").read_text()) | {"numTraining": len(case_ids), "file_ending": ending}
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for case_id in case_ids:
        for source, target in (
            (COVID / "imagesTr" / f"{case_id}_0000.nii.gz", root / "imagesTr" / f"{case_id}_0000{ending}"),
            (COVID / "labelsTr" / f"{case_id}.nii.gz", root / "labelsTr" / f"{case_id}{ending}"),
        ):
            if ending == ".nii.gz":
                shutil.copyfile(source, target)
            else:
                sitk.WriteImage(sitk.ReadImage(str(source)), str(target))
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray], like: Path | None = None) -> None:
    """Write ``change(voxels)`` over ``path`` with the geometry of ``like`` (default: the file itself)."""
    reference = sitk.ReadImage(str(like or path))
    image = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def problems_of(call: Callable[[], object]) -> tuple[str, ...]:
    with pytest.raises(DatasetError) as raised:
        call()
    return raised.value.problems


def test_every_header_problem_is_reported_with_its_case(tmp_path: Path) -> None:
    ids = [f"covid_{i:03d}" for i in range(6)]
    root = make_covid_copy(tmp_path / "Dataset900_Broken", ids)
    (root / "labelsTr/covid_001.nii.gz").unlink()
    shutil.copyfile(COVID / "labelsTr/covid_010.nii.gz", root / "labelsTr/covid_002.nii.gz")
    truncate(root / "imagesTr/covid_003_0000.nii.gz", 20_000)
    truncate(root / "labelsTr/covid_004.nii.gz", 10)
    spacing = sitk.ReadImage(str(root / "labelsTr/covid_005.nii.gz"))
    spacing.SetSpacing((0.5, 0.5, 1.0))
    sitk.WriteImage(spacing, str(root / "labelsTr/covid_005.nii.gz"))
    (root / "imagesTr/notes.txt").write_text("stray file")
    problems = problems_of(lambda: read_dataset(root))
    expected = {
        "covid_001": "covid_001.nii.gz is missing",
        "covid_002": "has size",
        "covid_003": "covid_003_0000.nii.gz is truncated",
        "covid_004": "cannot read covid_004.nii.gz",
        "covid_005": "has spacing (0.5, 0.5, 1.0)",
        "notes.txt": "name must be <case>_<4-digit channel>.nii.gz",
    }
    assert len(problems) == len(expected), problems
    for name, text in expected.items():
        assert any(name in p and text in p for p in problems), (name, problems)
    assert "covid_000" not in "".join(problems)


def test_value_problems_are_found_by_validation_and_load_case(tmp_path: Path) -> None:
    """Written as .mha: ITK's NIfTI reader turns NaN into 0, MetaImage keeps it."""
    ids = ["covid_000", "covid_001", "covid_002", "covid_003"]
    root = make_covid_copy(tmp_path / "Dataset901_Values", ids, ".mha")
    rewrite(root / "labelsTr/covid_001.mha", lambda a: np.where(a > 0, 7, 0).astype(np.uint8))
    rewrite(root / "imagesTr/covid_002_0000.mha", lambda a: np.where(a > 200, np.nan, a).astype(np.float32))
    rewrite(root / "imagesTr/covid_003_0000.mha", lambda a: np.full_like(a, 3.0))
    info = read_dataset(root)
    problems = problems_of(lambda: validate_dataset(info))
    assert len(problems) == 3, problems
    assert "covid_001" in problems[0] and "[7]" in problems[0] and "declare" in problems[0]
    assert "covid_002" in problems[1] and "NaN" in problems[1]
    assert "covid_003" in problems[2] and "constant" in problems[2]
    assert "[7]" in problems_of(lambda: load_case(case(info, "covid_001")))[0]
    load_case(case(info, "covid_000"))
    all_problems = problems_of(lambda: SliceDataset([info], info.cases, patch=32))
    assert [p.split(":")[0] for p in all_problems] == ["covid_001", "covid_002", "covid_003"]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda root: (root / "dataset.json").unlink(), "dataset.json is missing"),
        (lambda root: (root / "dataset.json").write_text("{not json"), "dataset.json cannot be parsed"),
        (lambda root: shutil.rmtree(root / "imagesTr") or (root / "imagesTr").mkdir(), "imagesTr is missing or empty"),
    ],
)
def test_dataset_level_problems(tmp_path: Path, breakage: Callable[[Path], None], message: str) -> None:
    root = make_covid_copy(tmp_path / "Dataset902_Level", ["covid_000"])
    breakage(root)
    problems = problems_of(lambda: read_dataset(root))
    assert any(message in p for p in problems), problems


def test_dataset_json_problems_are_listed_together(tmp_path: Path) -> None:
    root = make_covid_copy(tmp_path / "Dataset903_Json", ["covid_000", "covid_001"])
    meta = json.loads((root / "dataset.json").read_text())
    meta |= {"labels": {"background": 0, "infection": 2}, "file_ending": ".png", "numTraining": 2}
    del meta["channel_names"]
    (root / "dataset.json").write_text(json.dumps(meta))
    problems = problems_of(lambda: read_dataset(root))
    assert len(problems) == 3 and all(p.startswith("dataset.json") for p in problems), problems


def test_missing_channel_and_orphan_label_and_count(tmp_path: Path) -> None:
    root = make_covid_copy(tmp_path / "Dataset904_Channels", ["covid_000", "covid_001"])
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "CT_soft"}
    (root / "dataset.json").write_text(json.dumps(meta | {"numTraining": 3}))
    shutil.copyfile(root / "imagesTr/covid_000_0000.nii.gz", root / "imagesTr/covid_000_0001.nii.gz")
    shutil.copyfile(COVID / "labelsTr/covid_010.nii.gz", root / "labelsTr/covid_010.nii.gz")
    problems = problems_of(lambda: read_dataset(root))
    assert len(problems) == 3, problems
    assert any("covid_001" in p and "covid_001_0001.nii.gz (CT_soft)" in p for p in problems)
    assert any("labelsTr/covid_010.nii.gz" in p and "without images" in p for p in problems)
    assert any("numTraining=3" in p for p in problems)


def test_read_datasets_collects_problems_of_every_dataset(tmp_path: Path) -> None:
    make_covid_copy(tmp_path / "Dataset905_Good", ["covid_000"])
    make_covid_copy(tmp_path / "Dataset906_SameName", ["covid_001"])
    broken = make_covid_copy(tmp_path / "Dataset907_Bad", ["covid_000", "covid_001"])
    (broken / "labelsTr/covid_001.nii.gz").unlink()
    (tmp_path / "Dataset908_NoJson").mkdir()
    problems = problems_of(lambda: read_datasets([tmp_path]))
    assert len(problems) == 3, problems
    assert any(p.startswith("Dataset907_Bad: covid_001") for p in problems)
    assert any(p.startswith("Dataset908_NoJson") for p in problems)
    assert any(p.startswith("COVID19CT: 2 datasets share") for p in problems), "both good copies are COVID19CT"


@pytest.mark.parametrize("ending", [".nii", ".nrrd", ".mha"])
def test_other_file_endings(tmp_path: Path, ending: str) -> None:
    root = make_covid_copy(tmp_path / "Dataset910_Formats", ["covid_000", "covid_001"], ending)
    info = read_dataset(root)
    image, label = load_case(case(info, "covid_001"))
    expected_image, expected_label = load_case(case(read_dataset(COVID), "covid_001"))
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(label, expected_label)
    image_file = root / "imagesTr" / f"covid_000_0000{ending}"
    truncate(image_file, image_file.stat().st_size // 2)
    problems = problems_of(lambda: validate_dataset(info))
    assert len(problems) == 1 and problems[0].startswith("covid_000"), problems


def test_unlabelled_dataset_when_labels_are_optional(tmp_path: Path) -> None:
    root = make_covid_copy(tmp_path / "Dataset909_Unlabelled", ["covid_000", "covid_001"])
    shutil.rmtree(root / "labelsTr")
    assert len(problems_of(lambda: read_dataset(root))) == 2
    info = read_dataset(root, require_labels=False)
    assert [c.label for c in info.cases] == [None, None]
    image, label = load_case(info.cases[0])
    assert image.shape == (1, 273, 369) and label is None
