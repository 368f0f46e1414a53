"""Datasets in the nnU-Net v2 raw layout: reading, validation, splits, shared classes and training slices.

A dataset folder holds ``dataset.json``, ``imagesTr/<case>_<CCCC><ending>`` (one file per channel) and
``labelsTr/<case><ending>``; endings .nii.gz, .nii, .nrrd and .mha are read with SimpleITK. Slices lie along
the last file axis (numpy axis 0 of ``sitk.GetArrayFromImage``); a 2-D case is a volume of one slice.

SimpleITK is imported only where files are read: training from a prepared file (``prepared.py``) and
inference on arrays need no image reader.

Users point the tool at their own folders, so every check reports all problems at once, each with the case
it concerns (``DatasetError``), and nothing is dropped silently.

Imaging physics: a dataset is CT when the word "CT" (or "CBCT") appears in its dataset.json "modality" text
or in a channel name, and MRI otherwise. This only selects the degradation protocol (radial sparse-view
sampling for CT, Cartesian k-space undersampling for MRI), so any non-CT modality is treated like MRI.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from .augmentation import Augmentation
from .intensity import fit_window, normalize, to_unit_range

log = logging.getLogger(__name__)

FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
Imaging = Literal["MRI", "CT"]
BACKGROUND = "background"
GEOMETRY_RTOL = 1e-4
"""Relative tolerance for spacing, origin and direction: float32 headers round at about 1e-7."""


class DatasetError(ValueError):
    """Everything wrong with one or more datasets, one line per problem, each naming its case and file."""

    def __init__(self, problems: Sequence[str], source: str) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}\nFix them and run again.")


@dataclass(frozen=True)
class Case:
    """One training case: its image files (one per channel, in channel order) and its label file."""

    dataset: str
    """The dataset's short name (dataset.json "name"), e.g. "ACDC"."""
    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    label_values: tuple[int, ...] | None = None
    """Label values dataset.json allows; ``load_case`` rejects others. None: only checked to be 0..255."""


@dataclass(frozen=True)
class SliceRef:
    """Slices ``start:stop`` of one case: how a dataset of a single patient is split (see ``split_cases``)."""

    case: Case
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"SliceRef needs 0 <= start < stop, got start={self.start}, stop={self.stop}")

    @property
    def dataset(self) -> str:
        return self.case.dataset

    @property
    def case_id(self) -> str:
        return self.case.case_id


CaseLike = Union[Case, SliceRef]  # noqa: UP007 (evaluated at import: Python 3.9 has no X | Y)


@dataclass
class DatasetInfo:
    """One dataset folder as ``read_dataset`` found and checked it."""

    name: str
    """The dataset folder's name, e.g. "Dataset001_ACDC"."""
    short_name: str
    """dataset.json "name", e.g. "ACDC" (the folder name without "DatasetNNN_" if absent)."""
    modality: str
    """dataset.json "modality" text, else the channel names joined."""
    imaging: Imaging
    """"CT" or "MRI" (see the module docstring)."""
    channels: dict[int, str]
    labels: dict[str, int]
    cases: list[Case]
    spacing_known: bool
    """dataset.json "spacing_known" (False when the headers hold placeholder 1 mm spacing); default True."""
    root: Path


# ---------------------------------------------------------------------------------------------- dataset.json


def _int_key(key: str) -> int | None:
    return int(key) if str(key).isdigit() else None


def _parse_channels(meta: dict[str, Any], problems: list[str]) -> dict[int, str]:
    """nnU-Net v2 "channel_names", or the legacy v1 "modality" dict."""
    raw = meta.get("channel_names", meta.get("modality") if isinstance(meta.get("modality"), dict) else None)
    if not isinstance(raw, dict) or not raw:
        problems.append('dataset.json: "channel_names" is missing or empty; add e.g. {"0": "CT"}')
        return {}
    channels = {_int_key(k): str(v) for k, v in raw.items()}
    if None in channels or sorted(channels) != list(range(len(channels))):
        problems.append(f'dataset.json: "channel_names" keys must be "0", "1", ... without gaps, got {sorted(raw)}')
        return {}
    return dict(sorted(channels.items()))


def _parse_labels(meta: dict[str, Any], problems: list[str]) -> dict[str, int]:
    """Integer labels 0..n without gaps, 0 = background, as nnU-Net requires; regions are unsupported."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        problems.append('dataset.json: "labels" is missing or empty; add e.g. {"background": 0, "liver": 1}')
        return {}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        problems.append('dataset.json: every "labels" value must be one integer (region lists are not supported)')
        return {}
    if sorted(raw.values()) != list(range(len(raw))) or raw.get(BACKGROUND) != 0:
        problems.append(f'dataset.json: "labels" must be "background": 0 and then 1, 2, ... without gaps, got {raw}')
        return {}
    return dict(sorted(raw.items(), key=lambda item: item[1]))


def _parse_ending(meta: dict[str, Any], problems: list[str]) -> str:
    ending = meta.get("file_ending")
    if ending not in FILE_ENDINGS:
        problems.append(f'dataset.json: "file_ending" must be one of {", ".join(FILE_ENDINGS)}, got {ending!r}')
        return ""
    return ending


def _short_name(meta: dict[str, Any], folder: str, problems: list[str]) -> str:
    name = str(meta.get("name") or re.sub(r"^Dataset\d+_", "", folder))
    if "/" in name or not name:
        problems.append(f'dataset.json: "name" {name!r} must be non-empty and contain no "/" (it prefixes class keys)')
    return name


def _imaging(text: str) -> Imaging:
    return "CT" if re.search(r"\b(CB)?CT", text, re.IGNORECASE) else "MRI"


def _read_meta(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The parsed dataset.json, or None and why not."""
    path = root / "dataset.json"
    if not path.is_file():
        return None, [f"dataset.json is missing in {root}; write one as nnU-Net v2 describes (channel_names, labels)"]
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, [f"dataset.json cannot be parsed: {error}"]
    if not isinstance(meta, dict):
        return None, ["dataset.json must hold a JSON object"]
    return meta, []


# ------------------------------------------------------------------------------------------------ case files


def _visible_files(folder: Path) -> list[Path]:
    """Files of a folder, without hidden ones (.DS_Store, ._ resource forks)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _image_files(root: Path, ending: str, channels: dict[int, str], problems: list[str]) -> dict[str, dict[int, Path]]:
    """case id -> channel -> file, reporting every file that does not fit the naming scheme."""
    cases: dict[str, dict[int, Path]] = {}
    for path in _visible_files(root / "imagesTr"):
        match = re.fullmatch(r"(.+)_(\d{4})" + re.escape(ending), path.name)
        if match is None:
            problems.append(f"imagesTr/{path.name}: name must be <case>_<4-digit channel>{ending}; rename or remove it")
        elif int(match[2]) not in channels:
            channel = int(match[2])
            problems.append(f"{match[1]}: imagesTr/{path.name} is channel {channel}, not in channel_names {channels}")
        else:
            cases.setdefault(match[1], {})[int(match[2])] = path
    return cases


def _label_files(
    root: Path, ending: str, case_ids: Iterable[str], required: bool, problems: list[str]
) -> dict[str, Path]:
    """case id -> label file; missing labels are problems only when labels are required."""
    folder = root / "labelsTr"
    present = {p.name: p for p in _visible_files(folder)} if folder.is_dir() else {}
    labels = {}
    for case_id in case_ids:
        path = present.pop(case_id + ending, None)
        if path is not None:
            labels[case_id] = path
        elif required:
            problems.append(f"{case_id}: label labelsTr/{case_id}{ending} is missing; add it or remove the images")
    problems += [f"labelsTr/{name}: label without images in imagesTr; add the images or remove it" for name in present]
    return labels


def _build_cases(
    short: str, ending: str, channels: dict[int, str], labels: dict[str, int],
    images: dict[str, dict[int, Path]], label_paths: dict[str, Path], problems: list[str],
) -> list[Case]:
    """Cases with every channel; a case missing one is a problem."""
    cases = []
    for case_id, files in images.items():
        missing = [f"{case_id}_{c:04d}{ending} ({channels[c]})" for c in channels if c not in files]
        if missing:
            problems.append(f"{case_id}: missing channel file(s) {', '.join(missing)} in imagesTr")
            continue
        label_values = tuple(labels.values())
        cases.append(Case(short, case_id, tuple(files[c] for c in channels), label_paths.get(case_id), label_values))
    return cases


# --------------------------------------------------------------------------------------------------- headers


NIFTI_LAYOUTS = {348: ("h", 40, 72, "f", 108), 540: ("q", 16, 14, "q", 168)}
"""Header size -> (dim type, dim offset, bitpix offset, vox_offset type, vox_offset offset) of NIfTI-1 and -2."""


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header plus voxel bytes a NIfTI-1/2 file must hold; None when the header is not NIfTI."""
    for order in "<>":
        size = struct.unpack_from(order + "i", header)[0] if len(header) >= 4 else 0
        if size not in NIFTI_LAYOUTS or len(header) < size:
            continue
        dim_type, dim_at, bitpix_at, offset_type, offset_at = NIFTI_LAYOUTS[size]
        dims = struct.unpack_from(order + 8 * dim_type, header, dim_at)
        bitpix = struct.unpack_from(order + "h", header, bitpix_at)[0]
        offset = struct.unpack_from(order + offset_type, header, offset_at)[0]
        if not 1 <= dims[0] <= 7:
            return None
        return int(offset) + math.prod(dims[1 : dims[0] + 1]) * bitpix // 8
    return None


def _decompressed_size(path: Path, expected: int) -> int:
    """Bytes a .gz file inflates to: the gzip trailer when it agrees, otherwise by inflating it all."""
    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        if struct.unpack("<I", handle.read(4))[0] == expected % 2**32:
            return expected
    size = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            size += len(chunk)
    return size


def _nifti_size_problem(path: Path) -> str | None:
    """ITK reads a truncated NIfTI without complaint (the missing voxels are garbage), so check its size."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            expected = _nifti_expected_bytes(handle.read(540))
        if expected is None:
            return None
        stored = _decompressed_size(path, expected) if path.name.endswith(".gz") else path.stat().st_size
    except (OSError, EOFError, zlib.error) as error:
        return f"{path.name} is truncated or corrupt ({error}); copy it again"
    if stored < expected:
        return f"{path.name} is truncated ({stored} of {expected} bytes); copy it again"
    return None


@dataclass(frozen=True)
class _Header:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int


def _error_text(error: Exception) -> str:
    """The informative last line of a (multi-line) SimpleITK error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _read_header(path: Path) -> _Header | str:
    """The image header of a file, or the problem that prevents reading it."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        return f"cannot read {path.name}: {_error_text(error)}"
    if path.name.endswith((".nii", ".nii.gz")) and (problem := _nifti_size_problem(path)):
        return problem
    return _Header(
        tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()),
        reader.GetNumberOfComponents(),
    )


def _geometry_problems(reference: _Header, other: _Header, names: tuple[str, str]) -> list[str]:
    """Size, spacing, origin and direction of ``other`` must match the first image channel's."""
    if reference.size != other.size:
        return [f"{names[1]} has size {other.size} but {names[0]} has {reference.size}; they must share one voxel grid"]
    scale = max(reference.spacing)
    checks = {
        "spacing": np.allclose(reference.spacing, other.spacing, rtol=GEOMETRY_RTOL, atol=0),
        "origin": np.allclose(reference.origin, other.origin, rtol=0, atol=GEOMETRY_RTOL * scale),
        "direction": np.allclose(reference.direction, other.direction, rtol=0, atol=GEOMETRY_RTOL),
    }
    return [
        f"{names[1]} has {key} {getattr(other, key)} but {names[0]} has {getattr(reference, key)}; "
        "resample one onto the other"
        for key, ok in checks.items()
        if not ok
    ]


def _header_problems(case: Case) -> list[str]:
    """Readability, dimensionality and matching geometry of every file of a case, from headers only."""
    files = [*case.images, *([case.label] if case.label is not None else [])]
    headers = {path: _read_header(path) for path in files}
    problems = [f"{case.case_id}: {h}" for h in headers.values() if isinstance(h, str)]
    for path, header in headers.items():
        if isinstance(header, _Header) and (len(header.size) not in (2, 3) or header.components != 1):
            problems.append(
                f"{case.case_id}: {path.name} has size {header.size} with {header.components} component(s); "
                "only single-component 2-D or 3-D images are supported (split channels into _0000, _0001, ...)"
            )
    reference = headers[case.images[0]]
    if problems or not isinstance(reference, _Header):
        return problems
    for path in files[1:]:
        names = (case.images[0].name, path.name)
        problems += [f"{case.case_id}: {p}" for p in _geometry_problems(reference, headers[path], names)]
    return problems


# ---------------------------------------------------------------------------------------------------- voxels


def _read_array(path: Path) -> np.ndarray:
    """(S, H, W) voxels; a 2-D file becomes one slice."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return array[None] if array.ndim == 2 else array


def _image_problems(case: Case, path: Path, image: np.ndarray) -> list[str]:
    """Images must be finite and not constant (a constant image has no contrast to normalise)."""
    bad = int(np.count_nonzero(~np.isfinite(image))) if np.issubdtype(image.dtype, np.floating) else 0
    if bad:
        return [f"{case.case_id}: {path.name} has {bad} NaN/Inf voxel(s); replace them, e.g. with the background value"]
    if image.size == 0 or image.min() == image.max():
        return [f"{case.case_id}: {path.name} is constant; check that the right file was written for this channel"]
    return []


def _present_values(labels: np.ndarray) -> list[int]:
    """Distinct values of a non-negative integer label map, by counting (much faster than np.unique)."""
    counts = torch.bincount(torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8)).view(-1), minlength=256)
    return torch.nonzero(counts).flatten().tolist()


def _label_problems(case: Case, label: np.ndarray) -> list[str]:
    """Labels must be whole numbers in 0..255 that dataset.json declares."""
    name = case.label.name if case.label is not None else "label"
    if not np.issubdtype(label.dtype, np.integer) and not np.array_equal(label, np.round(label)):
        return [f"{case.case_id}: {name} has non-integer values; labels must be whole class numbers"]
    if label.dtype != np.uint8 and label.size and (label.min() < 0 or label.max() > 255):
        return [f"{case.case_id}: {name} has values outside 0..255 (min {label.min()}, max {label.max()})"]
    allowed = case.label_values
    unknown = [v for v in _present_values(label) if v not in allowed] if allowed is not None else []
    if unknown:
        return [
            f"{case.case_id}: {name} has label value(s) {unknown} that dataset.json does not declare "
            f"(declared: {list(allowed)}); add them to \"labels\" or fix the label file"
        ]
    return []


def _read_checked(case: Case, paths: Iterable[Path], problems: list[str]) -> dict[Path, np.ndarray]:
    """Voxels of ``paths``; unreadable files become problems."""
    arrays = {}
    for path in paths:
        try:
            arrays[path] = _read_array(path)
        except RuntimeError as error:
            problems.append(f"{case.case_id}: cannot read {path.name}: {_error_text(error)}")
    return arrays


def _value_problems(case: Case, channels: Sequence[int]) -> tuple[list[str], dict[Path, np.ndarray]]:
    """Header and voxel problems of the given channels and the label, with the voxels read."""
    problems = _header_problems(case)
    if problems:
        return problems, {}
    paths = [case.images[c] for c in channels] + ([case.label] if case.label is not None else [])
    arrays = _read_checked(case, paths, problems)
    for c in channels:
        if case.images[c] in arrays:
            problems += _image_problems(case, case.images[c], arrays[case.images[c]])
    if case.label in arrays:
        problems += _label_problems(case, arrays[case.label])
    return problems, arrays


# ------------------------------------------------------------------------------------------------ public I/O


def _folder_problems(root: Path) -> list[str]:
    folder = root / "imagesTr"
    if not folder.is_dir() or not _visible_files(folder):
        return [f"imagesTr is missing or empty in {root}; put the images there as <case>_0000<file_ending>"]
    return []


def _info(
    root: Path, meta: dict[str, Any], short: str, channels: dict[int, str], labels: dict[str, int], cases: list[Case]
) -> DatasetInfo:
    modality = meta["modality"] if isinstance(meta.get("modality"), str) else ", ".join(channels.values())
    return DatasetInfo(
        name=root.name,
        short_name=short,
        modality=modality,
        imaging=_imaging(" ".join([modality, *channels.values()])),
        channels=channels,
        labels=labels,
        cases=cases,
        spacing_known=bool(meta.get("spacing_known", True)),
        root=root,
    )


def read_dataset(root: str | Path, require_labels: bool = True) -> DatasetInfo:
    """Read and check a dataset folder from its dataset.json, file names and image headers.

    Voxels are not read here (that takes seconds per dataset): label values and NaNs are checked by
    ``validate_dataset(info, check_values=True)`` and by ``load_case``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError([f"{root} is not a folder; point to a DatasetNNN_Name folder"], str(root))
    meta, problems = _read_meta(root)
    problems += _folder_problems(root)
    if meta is None:
        raise DatasetError(problems, str(root))
    channels, labels = _parse_channels(meta, problems), _parse_labels(meta, problems)
    ending, short = _parse_ending(meta, problems), _short_name(meta, root.name, problems)
    if problems:
        raise DatasetError(problems, str(root))
    images = _image_files(root, ending, channels, problems)
    label_paths = _label_files(root, ending, images, require_labels, problems)
    cases = _build_cases(short, ending, channels, labels, images, label_paths, problems)
    if meta.get("numTraining", len(images)) != len(images):
        problems.append(
            f"dataset.json says numTraining={meta['numTraining']} but imagesTr holds {len(images)} case(s); "
            "fix numTraining"
        )
    for case in cases:
        problems += _header_problems(case)
    if problems:
        raise DatasetError(problems, str(root))
    return _info(root, meta, short, channels, labels, cases)


def _dataset_folders(root: Path) -> tuple[list[Path], list[str]]:
    """A dataset folder itself, or the DatasetNNN_* folders inside a folder of datasets."""
    if (root / "dataset.json").is_file() or not root.is_dir():
        return [root], []
    children = sorted(p for p in root.iterdir() if p.is_dir() and (p / "dataset.json").is_file())
    broken = sorted(p for p in root.iterdir() if p.is_dir() and re.match(r"Dataset\d+_", p.name) and p not in children)
    if not children:
        return [root], []
    return children, [f"{p.name}: dataset.json is missing; add it or move the folder away" for p in broken]


def read_datasets(roots: str | Path | Iterable[str | Path], require_labels: bool = True) -> list[DatasetInfo]:
    """Read several datasets (each root a dataset folder or a folder of them), reporting all problems at once."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    infos, problems = [], []
    for root in roots:
        folders, missing = _dataset_folders(Path(root))
        problems += missing
        for folder in folders:
            try:
                infos.append(read_dataset(folder, require_labels))
            except DatasetError as error:
                problems += [f"{folder.name}: {p}" for p in error.problems]
    names = [info.short_name for info in infos]
    problems += [
        f'{name}: {names.count(name)} datasets share this "name" in dataset.json; give each a unique name'
        for name in sorted(set(names))
        if names.count(name) > 1
    ]
    if problems:
        raise DatasetError(problems, "the datasets " + ", ".join(str(r) for r in roots))
    return infos


def validate_dataset(info: DatasetInfo, check_values: bool = True) -> None:
    """Re-check every case's headers and, with ``check_values``, its voxels; raises one DatasetError for all."""
    problems = []
    for case in info.cases:
        if check_values:
            problems += _value_problems(case, range(len(case.images)))[0]
        else:
            problems += _header_problems(case)
    if problems:
        raise DatasetError(problems, info.name)


def _as_case(case: CaseLike) -> tuple[Case, slice]:
    return (case.case, slice(case.start, case.stop)) if isinstance(case, SliceRef) else (case, slice(None))


def load_case(case: CaseLike, channel: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(S, H, W) float32 image of one channel and uint8 label (None without one), checked.

    Slices run along the file's last axis; a ``SliceRef`` gives only its slices.
    """
    whole, selection = _as_case(case)
    if not 0 <= channel < len(whole.images):
        raise ValueError(f"{whole.case_id} has channels 0..{len(whole.images) - 1}, got channel={channel}")
    problems, arrays = _value_problems(whole, [channel])
    if problems:
        raise DatasetError(problems, f"case {whole.case_id} of {whole.dataset}")
    image = arrays[whole.images[channel]].astype(np.float32)
    label = arrays[whole.label].astype(np.uint8) if whole.label is not None else None
    if selection.stop is not None and selection.stop > len(image):
        raise ValueError(f"{whole.case_id} has {len(image)} slices, not {selection.start}:{selection.stop}")
    return image[selection], (label[selection] if label is not None else None)


# ------------------------------------------------------------------------------------------------------ split


def patient_id(case_id: str) -> str:
    """The patient of a case: ACDC-style ``patientNNN_frameXX`` -> ``patientNNN``; other ids are their own."""
    return re.sub(r"_frame\d+$", "", case_id)


def _num_slices(case: Case) -> int:
    header = _read_header(case.images[0])
    if isinstance(header, str):
        raise DatasetError([f"{case.case_id}: {header}"], f"dataset {case.dataset}")
    return header.size[2] if len(header.size) == 3 else 1


def _split_slices(
    cases: Sequence[Case], val_fraction: float, rng: np.random.Generator
) -> tuple[list[SliceRef], list[SliceRef]]:
    """One contiguous validation block per case at a seeded position; the slices around it train.

    A block, not scattered slices, keeps near-identical neighbours out of validation except at its two edges.
    A one-slice case cannot be split and trains only.
    """
    train, val = [], []
    for case in cases:
        count = _num_slices(case)
        if count < 2:
            train.append(SliceRef(case, 0, count))
            continue
        size = min(count - 1, max(1, round(val_fraction * count)))
        start = int(rng.integers(0, count - size + 1))
        val.append(SliceRef(case, start, start + size))
        train += [SliceRef(case, a, b) for a, b in ((0, start), (start + size, count)) if b > a]
    return train, val


def split_seed_of(run: dict[str, Any]) -> int:
    """The split seed a run config (as a model's `extra["run"]` stores it) drew its held-out cases with."""
    return run["split_seed"] if run.get("split_seed") is not None else run.get("seed", 0)


def split_cases(info: DatasetInfo, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[CaseLike], list[CaseLike]]:
    """Seeded (train, validation) split by patient, so no patient is on both sides.

    ``round(val_fraction * patients)`` patients validate, at least one and never all. A dataset with a single
    patient (one case, like AbdomenCT) is split by slices instead, into ``SliceRef``s (see ``_split_slices``).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    patients = sorted({patient_id(c.case_id) for c in info.cases})
    if len(patients) < 2:
        return _split_slices(info.cases, val_fraction, rng)
    count = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
    held_out = set(rng.permutation(patients)[:count].tolist())
    train = [c for c in info.cases if patient_id(c.case_id) not in held_out]
    val = [c for c in info.cases if patient_id(c.case_id) in held_out]
    return train, val


# ---------------------------------------------------------------------------------- modality and label spaces


@dataclass(frozen=True)
class ModalityClass:
    key: str
    """"<dataset short name>/<channel name>", e.g. "BraTS2015/FLAIR"."""
    display: str
    """Human-readable, e.g. "brain MRI, FLAIR (BraTS2015)"."""
    imaging: Imaging


def _check_unique(infos: Sequence[DatasetInfo]) -> None:
    names = [info.short_name for info in infos]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset short names must be unique, got {names}; rename one in its dataset.json")


def _display(info: DatasetInfo, channel: str) -> str:
    if re.search(rf"\b{re.escape(channel)}\b", info.modality, re.IGNORECASE):
        return f"{info.modality} ({info.short_name})"
    return f"{info.modality}, {channel} ({info.short_name})"


def modality_classes(infos: Sequence[DatasetInfo]) -> list[ModalityClass]:
    """One class per dataset and channel (sequence), as the paper treats each dataset as a modality."""
    _check_unique(infos)
    return [
        ModalityClass(f"{info.short_name}/{channel}", _display(info, channel), info.imaging)
        for info in infos
        for channel in info.channels.values()
    ]


@dataclass(frozen=True)
class LabelSpace:
    """The classes of one shared segmentation head: background, then every dataset's foreground classes."""

    keys: tuple[str, ...]
    """Index 0 "background", then "<dataset>/<class>", e.g. "ACDC/RV"."""
    dataset_classes: dict[str, tuple[int, ...]]
    """Dataset short name -> global indices of its foreground classes, in the order of its label values 1..n."""

    def __post_init__(self) -> None:
        if not self.keys or self.keys[0] != BACKGROUND or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"keys must be unique and start with {BACKGROUND!r}, got {list(self.keys)[:4]}...")
        for name, indices in self.dataset_classes.items():
            if len(set(indices)) != len(indices) or not all(0 < i < len(self.keys) for i in indices):
                last = len(self.keys) - 1
                raise ValueError(f"{name}: class indices {list(indices)} must be distinct and in 1..{last}")

    def _classes(self, dataset: str) -> tuple[int, ...]:
        if dataset not in self.dataset_classes:
            raise ValueError(f"Unknown dataset {dataset!r}; the label space has {sorted(self.dataset_classes)}")
        return self.dataset_classes[dataset]

    def class_mask(self, dataset: str) -> torch.Tensor:
        """(n_global,) bool: background and the dataset's own classes, the ones its labels can teach."""
        mask = torch.zeros(len(self.keys), dtype=torch.bool)
        mask[[0, *self._classes(dataset)]] = True
        return mask

    def to_global(self, dataset: str, local: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """int64 global class indices of a dataset's label map (values 0..n of its dataset.json)."""
        return _lookup(local, [0, *self._classes(dataset)], f"{dataset} label values", "check the label file")

    def to_local(self, dataset: str, global_labels: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """int64 label values 0..n of ``dataset`` from global class indices of its own classes."""
        table = [-1] * len(self.keys)
        for local, index in enumerate([0, *self._classes(dataset)]):
            table[index] = local
        return _lookup(global_labels, table, f"classes outside {dataset}", "restrict the logits with class_mask first")

    def to_dict(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "dataset_classes": {k: list(v) for k, v in self.dataset_classes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSpace:
        if set(data) != {"keys", "dataset_classes"}:
            raise ValueError(f"A label space needs exactly the keys keys, dataset_classes; got {sorted(data)}")
        return cls(tuple(data["keys"]), {k: tuple(v) for k, v in data["dataset_classes"].items()})


def _lookup(values: np.ndarray | torch.Tensor, table: list[int], what: str, fix: str) -> np.ndarray | torch.Tensor:
    """``table[values]`` as int64 in the input's framework; entries -1 or values outside the table are errors."""
    is_tensor = isinstance(values, torch.Tensor)
    array = (values.detach().cpu().numpy() if is_tensor else np.asarray(values)).astype(np.int64)
    lut = np.asarray(table, dtype=np.int64)
    inside = (array >= 0) & (array < len(lut))
    bad = np.unique(array[~inside]).tolist() if not inside.all() else []
    bad += np.flatnonzero((lut < 0) & (np.bincount(array[inside], minlength=len(lut)) > 0)).tolist()
    if bad:
        raise ValueError(f"{what}: values {bad} have no mapping (valid: {np.flatnonzero(lut >= 0).tolist()}); {fix}")
    result = lut[array]
    return torch.from_numpy(result).to(values.device) if is_tensor else result


def label_space(infos: Sequence[DatasetInfo]) -> LabelSpace:
    """Background plus each dataset's foreground classes, datasets in the given order."""
    _check_unique(infos)
    keys, classes = [BACKGROUND], {}
    for info in infos:
        names = [name for name, value in info.labels.items() if value > 0]
        classes[info.short_name] = tuple(range(len(keys), len(keys) + len(names)))
        keys += [f"{info.short_name}/{name}" for name in names]
    return LabelSpace(tuple(keys), classes)


# ------------------------------------------------------------------------------------------ training slices


def content_box(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a height x width slice once resized to longer side ``patch`` and centred."""
    scale = patch / max(height, width)
    size = max(1, round(height * scale)), max(1, round(width * scale))
    return (patch - size[0]) // 2, (patch - size[1]) // 2, *size


def _pad_centre(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Zero-pad the last two axes to patch x patch with the content centred."""
    height, width = x.shape[-2:]
    top, left = (patch - height) // 2, (patch - width) // 2
    return F.pad(x, (left, patch - width - left, top, patch - height - top))


def _nearest_indices(size_in: int, size_out: int) -> torch.Tensor:
    """Source pixel of each output pixel for nearest-neighbour resizing (pixel centres aligned)."""
    centres = (torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out)
    return centres.floor().long().clamp(max=size_in - 1)


def resize_images(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) float images at longer side ``patch`` (area averaging down, bilinear up, so [0, 1] stays
    [0, 1]), centre-padded with 0 to (N, C, P, P): the geometry of every training sample."""
    _, _, height, width = content_box(*images.shape[-2:], patch)
    mode = "area" if height < images.shape[-2] else "bilinear"
    options = {} if mode == "area" else {"align_corners": False}
    resized = F.interpolate(images, size=(height, width), mode=mode, **options)
    return _pad_centre(resized, patch)


def resize_slices(slices: np.ndarray, patch: int, kind: Literal["image", "label"]) -> np.ndarray:
    """(S, H, W) slices resized so the longer side is ``patch`` (aspect kept), centre-padded to (S, P, P).

    The geometry of every training sample, so evaluation can reproduce it. Images (float32) go through
    ``resize_images``; labels take the nearest pixel (pixel centres aligned) and keep their dtype, so no
    class values are invented. Padding is 0: black image, background.
    """
    if slices.ndim != 3 or kind not in ("image", "label"):
        raise ValueError(f"resize_slices needs (S, H, W) slices and kind 'image'/'label', got {slices.shape}, {kind!r}")
    if kind == "label":
        _, _, height, width = content_box(*slices.shape[-2:], patch)
        rows, cols = _nearest_indices(slices.shape[1], height), _nearest_indices(slices.shape[2], width)
        return _pad_centre(torch.from_numpy(slices)[:, rows][:, :, cols], patch).numpy()
    images = torch.from_numpy(np.asarray(slices, dtype=np.float32))[:, None]
    return resize_images(images, patch)[:, 0].numpy()


class SliceDataset(Dataset):
    """All slices of some cases of several datasets, held in memory at patch size.

    Each volume is normalised once with ``intensity.fit_window`` + ``to_unit_range``, then every slice is
    resized and padded to patch x patch (``resize_slices``); labels become global classes of the label space.
    Slices that are all zero after normalisation (outside the body or brain) are skipped and counted in
    ``skipped``. A multi-channel dataset gives one sample per channel and slice, each channel its own modality
    class. Degradation is not applied here: it runs batched on the training device. With ``native``, each sample
    also keeps its normalised slice at the scan's own size (8-bit, as `prepared` stores images), from which
    ``native_indices`` and ``native_slice`` give the prior tiles at the scale `inference.prior_tiles` reads.
    """

    def __init__(
        self,
        infos: Sequence[DatasetInfo],
        cases: Sequence[CaseLike],
        modalities: Sequence[ModalityClass] | None = None,
        labels: LabelSpace | None = None,
        patch: int = 128,
        augment: bool = False,
        native: bool = False,
    ) -> None:
        self.infos = {info.short_name: info for info in infos}
        self._set_spaces(
            modalities if modalities is not None else modality_classes(infos),
            labels if labels is not None else label_space(infos),
            patch,
            augment,
        )
        label_dtype = torch.uint8 if len(self.label_space.keys) <= 256 else torch.int32
        images, label_maps, meta, problems = [], [], [], []
        self.native = [] if native else None
        for case in cases:
            for channel, modality in self._channels(case):
                try:
                    image, label = self._slices(case, channel, label_dtype)
                except DatasetError as error:
                    problems += error.problems
                    continue
                images.append(image)
                label_maps.append(label)
                meta += [(self.datasets.index(case.dataset), modality)] * len(image)
        if problems:
            raise DatasetError(problems, "the training cases")
        if self.skipped:
            log.info("SliceDataset: skipped %d all-zero slice(s) of %d", self.skipped, self.skipped + len(meta))
        self.images = torch.cat(images) if images else torch.zeros(0, 1, patch, patch)
        self.labels = torch.cat(label_maps) if label_maps else torch.zeros(0, patch, patch, dtype=label_dtype)
        self.sample_dataset = torch.tensor([m[0] for m in meta], dtype=torch.int64)
        self.sample_modality = torch.tensor([m[1] for m in meta], dtype=torch.int64)

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        modalities: Sequence[ModalityClass],
        labels: LabelSpace,
        patch: int,
        augment: bool = False,
    ) -> SliceDataset:
        """Slices already at patch size (``images``, ``labels``, ``sample_dataset``, ``sample_modality``, as
        the attributes of that name): nothing is read, normalised or resized (``prepared.load``)."""
        dataset = cls.__new__(cls)
        dataset.infos, dataset.native = {}, None
        dataset._set_spaces(modalities, labels, patch, augment)
        dataset.images, dataset.labels = tensors["images"], tensors["labels"]
        dataset.sample_dataset, dataset.sample_modality = tensors["sample_dataset"], tensors["sample_modality"]
        return dataset

    def _set_spaces(self, modalities: Sequence[ModalityClass], labels: LabelSpace, patch: int, augment: bool) -> None:
        if patch < 16:
            raise ValueError(f"patch must be at least 16 pixels, got {patch}")
        self.modalities, self.label_space = list(modalities), labels
        self.datasets = list(labels.dataset_classes)
        self.patch, self.augment, self.skipped = patch, augment, 0
        self.augmentation = Augmentation()
        self._masks = {name: labels.class_mask(name) for name in self.datasets}

    def _channels(self, case: CaseLike) -> list[tuple[int, int]]:
        """(channel, modality class index) of every channel of a case."""
        if case.dataset not in self.infos or case.dataset not in self._masks:
            raise ValueError(f"{case.case_id} is from dataset {case.dataset!r}, which the given infos/labels lack")
        keys = [m.key for m in self.modalities]
        channels = self.infos[case.dataset].channels
        missing = [f"{case.dataset}/{name}" for name in channels.values() if f"{case.dataset}/{name}" not in keys]
        if missing:
            raise ValueError(f"modality classes {missing} are not among the model's {keys}")
        return [(c, keys.index(f"{case.dataset}/{name}")) for c, name in channels.items()]

    def _slices(self, case: CaseLike, channel: int, label_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, non-empty, patch-sized slices (n, 1, P, P) and their global labels (n, P, P)."""
        whole, selection = _as_case(case)
        volume, label = load_case(whole, channel)
        if label is None:
            raise DatasetError([f"{case.case_id}: training slices need a label file"], f"dataset {case.dataset}")
        try:
            window = fit_window(volume)
        except ValueError as error:
            raise DatasetError([f"{case.case_id}: {whole.images[channel].name}: {error}"], case.dataset) from error
        image = to_unit_range(normalize(volume[selection], window))
        keep = np.flatnonzero(image.reshape(len(image), -1).any(axis=1))
        self.skipped += len(image) - len(keep)
        if self.native is not None:
            self.native += list(torch.from_numpy(np.round(255 * np.clip(image[keep], 0, 1))).to(torch.uint8))
        images = torch.from_numpy(resize_slices(image[keep], self.patch, "image"))[:, None]
        local = resize_slices(label[selection][keep], self.patch, "label")
        labels = torch.from_numpy(self.label_space.to_global(case.dataset, local))
        return images, labels.to(label_dtype)

    def __len__(self) -> int:
        return len(self.images)

    def item(self, index: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Sample ``index``; with ``augment``, ``augmentation`` changes it with draws from ``generator`` (None:
        torch's RNG)."""
        index = int(index)
        image, label = self.images[index].clone(), self.labels[index].to(torch.int64)
        if self.augment:
            image, label = self.augmentation(image, label, generator)
        dataset = int(self.sample_dataset[index])
        return {
            "clean": image,
            "label": label,
            "modality": self.sample_modality[index].clone(),
            "dataset": self.sample_dataset[index].clone(),
            "class_mask": self._masks[self.datasets[dataset]].clone(),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(index)

    def dataset_shares(self, weights: Mapping[str, float] | None = None) -> torch.Tensor:
        """Per dataset (in ``datasets`` order), its weight in ``weights`` by short name, 1 where not named.

        A name that is not one of these datasets is an error rather than a weight that silently does nothing.
        """
        weights = dict(weights or {})
        if unknown := sorted(set(weights) - set(self.datasets)):
            raise ValueError(f"dataset_weights names {unknown}, which are not datasets here; use the short names "
                             f"{self.datasets} (the `name` of each dataset.json)")
        shares = torch.tensor([float(weights.get(name, 1.0)) for name in self.datasets], dtype=torch.double)
        if (shares < 0).any() or not (shares > 0).any():
            raise ValueError(f"dataset_weights must be 0 or more with at least one above 0; got {weights}")
        return shares

    def sample_weights(self, weights: Mapping[str, float] | None = None) -> torch.Tensor:
        """(weight of the sample's dataset) / (slices of that dataset): each dataset carries its weight
        (`dataset_shares`, equal by default) in total, whatever its size."""
        if len(self) == 0:
            raise ValueError("The SliceDataset has no slices; give it cases with non-empty images")
        counts = torch.bincount(self.sample_dataset).double()
        return self.dataset_shares(weights)[self.sample_dataset] / counts[self.sample_dataset]

    def balanced_indices(
        self, count: int, generator: torch.Generator | None = None, weights: Mapping[str, float] | None = None,
    ) -> torch.Tensor:
        """``count`` sample indices, each dataset drawn in proportion to its weight (equally often by default)
        regardless of its size."""
        return torch.multinomial(self.sample_weights(weights), count, replacement=True, generator=generator)

    def native_indices(
        self, count: int, size: int, generator: torch.Generator | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> torch.Tensor:
        """``count`` indices of samples whose own slice is larger than ``size`` on a side (smaller ones are read
        whole, as at patch size), each such dataset drawn in proportion to its weight (equally often by default);
        empty when there are none."""
        if self.native is None:
            raise ValueError("This SliceDataset holds no slices at their own size: build it from the dataset folders "
                             "with native=True (a prepared .vldun file keeps patch-size slices only)")
        large = torch.tensor([max(s.shape) > size for s in self.native], dtype=torch.bool)
        if count == 0 or not large.any():
            return torch.zeros(0, dtype=torch.int64)
        counts = torch.bincount(self.sample_dataset[large], minlength=len(self.datasets)).double()
        shares = self.dataset_shares(weights)[self.sample_dataset]
        chances = torch.where(large, shares / counts.clamp_min(1)[self.sample_dataset], 0.0)
        if not chances.any():
            return torch.zeros(0, dtype=torch.int64)
        return torch.multinomial(chances, count, replacement=True, generator=generator)

    def native_slice(self, index: int) -> torch.Tensor:
        """Sample ``index`` at the scan's own size, (1, 1, H, W) float in [0, 1]."""
        return self.native[int(index)][None, None].float() / 255


def balanced_sampler(ds: SliceDataset, num_samples: int, seed: int) -> Sampler[int]:
    """A seeded sampler drawing every dataset equally often regardless of its size (with replacement)."""
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(ds.sample_weights(), num_samples, replacement=True, generator=generator)
