"""Datasets in the nnU-Net v2 raw layout: reading and validation, one case at a time.

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

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from VLDUNLib.nifti import nifti_size_problem

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


CaseLike = Union[Case, SliceRef]


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
    if path.name.endswith((".nii", ".nii.gz")) and (problem := nifti_size_problem(path)):
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


def voxel_volume_ml(case: CaseLike) -> float:
    """The volume of one voxel of the case's first image, in mL, from its header."""
    header = _read_header(_as_case(case)[0].images[0])
    if isinstance(header, str):
        raise ValueError(header)  # noqa: TRY004 (an unreadable file, not a wrong type)
    return float(np.prod(header.spacing[:3])) / 1000.0


# ------------------------------------------------------------------------------------------------------ split

