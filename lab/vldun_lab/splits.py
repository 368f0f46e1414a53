"""Held-out splits: by patient, or by slice blocks for a single-patient dataset; seeded and repeatable."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .datasets import Case, CaseLike, DatasetError, DatasetInfo, SliceRef, _read_header


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

