"""Model weights on disk: safetensors tensors + a JSON config carrying their SHA-256.

A weights file is never unpickled, and nothing of it is used before its hash matches the config and
the config has been checked (known preset, class names for every output channel, tensor shapes equal
to the architecture's). The JSON also carries what inference needs besides tensors: the class names
per dataset, the modality classes and their readable names, the segmentation tasks a user can choose and
the unknown-scan statistics.

Two hashes seal a model: `sha256` covers the .safetensors file, and `config_sha256` covers the JSON itself,
as the SHA-256 of its canonical form (`canonical_json`: every key except the two hashes, keys sorted, no
whitespace, ASCII). Editing anything in the JSON (swapping two class names, the OOD threshold) therefore
makes the model refuse to load. Whoever changes the JSON on purpose re-seals it with `rewrite_info(path, info)`
(or `reseal(path)` after editing the file by hand), which recomputes both hashes.

torch and safetensors are imported only where tensors are read or written, so `read_model_info` (a model's
classes and tasks, e.g. for Slicer's task selector) runs in a process that has not loaded torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import PRESETS, VLDUNConfig
from .ood import NearestNeighbourOOD
from .tasks import Task, default_modality_names, derive_tasks

if TYPE_CHECKING:
    import torch

FORMAT = "vldun-weights/1"
MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
DEFAULT_WEIGHTS = MODELS_DIR / "vldun_compact.safetensors"


class WeightsError(ValueError):
    """A weights file or its config that must not be used; the message names the fix."""


@dataclass
class ModelInfo:
    """Everything about a trained model that is not a tensor."""

    config: VLDUNConfig
    classes: list[str] = field(default_factory=lambda: ["background"])
    """Global class keys of the shared segmentation head, index 0 background, e.g. "ACDC/LV"."""
    dataset_classes: dict[str, list[int]] = field(default_factory=dict)
    """Dataset short name -> the global class indices it labels."""
    ood_threshold: float = 0.5
    """Modality confidence under which a scan is reported as unlike the training data; used only by models
    without `ood` statistics."""
    train_size: int | None = None
    """Longer side, in pixels, of the training slices; inference segments at this scale (None: native)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Provenance (data, command, metrics): copied into the model card, never interpreted."""
    modality_names: dict[str, str] = field(default_factory=dict)
    """Modality key -> what a person reads, e.g. "ACDC/MRI" -> "MRI · heart, cine"; empty: the defaults."""
    tasks: dict[str, Task] = field(default_factory=dict)
    """Task id -> its classes, e.g. "heart"; empty: derived from `dataset_classes`."""
    ood: NearestNeighbourOOD | None = None
    """Unknown-scan statistics of the prior's embedding (`vldun calibrate-ood`); None: `ood_threshold` is used."""
    segment_native: bool = False
    """The segmentation head learned on tiles at the scans' own pixel size too, so inference segments each slice
    at its own size in the restoring pass; False: at `train_size`, in a second pass."""

    def __post_init__(self) -> None:
        self.modality_names = {**default_modality_names(self.config.modalities), **self.modality_names}
        self.tasks = self.tasks or derive_tasks(self.dataset_classes)

    def task_labels(self) -> dict[str, str]:
        """Task id -> readable label of the tasks a user can choose (those with classes), in the model's order."""
        return {task_id: task.label for task_id, task in self.tasks.items() if task.classes}

    def to_dict(self, sha256: str) -> dict[str, Any]:
        """The sealed JSON content: `sha256` of the tensors file, then `config_sha256` of the rest."""
        meta = {
            "format": FORMAT,
            "sha256": sha256,
            "config": self.config.to_dict(),
            "classes": self.classes,
            "dataset_classes": self.dataset_classes,
            "ood_threshold": self.ood_threshold,
            "train_size": self.train_size,
            "modality_names": self.modality_names,
            "tasks": {k: t.to_dict() for k, t in self.tasks.items()},
            "ood": self.ood.to_dict() if self.ood else None,
            "segment_native": self.segment_native,
            "extra": self.extra,
        }
        meta["config_sha256"] = config_sha256(meta)
        return meta


HASH_KEYS = ("sha256", "config_sha256")


def canonical_json(meta: dict[str, Any]) -> str:
    """The JSON content `config_sha256` covers: everything but the two hashes, sorted, compact, ASCII."""
    return json.dumps({k: v for k, v in meta.items() if k not in HASH_KEYS}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_sha256(meta: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(meta).encode("ascii")).hexdigest()


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    """Write through a temporary file in the same folder, so a crash never leaves half a config."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(temp, path)


def rewrite_info(path: str | Path, info: ModelInfo) -> Path:
    """Re-seal a model after changing its non-tensor info: write `info` as the JSON beside the weights file
    `path` (.safetensors or .json), with the tensors' SHA-256 recomputed and a new `config_sha256`.
    The tensors are not touched. Returns the JSON path."""
    path = Path(path).with_suffix(".safetensors")
    if not path.is_file():
        raise WeightsError(f"{path} is missing; rewrite_info re-seals the JSON of an existing weights file.")
    json_path = config_path_for(path)
    _write_json(json_path, info.to_dict(sha256_of(path)))
    return json_path


def reseal(path: str | Path) -> Path:
    """Re-seal a JSON edited by hand: recompute both hashes over its current content (checked as on load)."""
    path = Path(path).with_suffix(".safetensors")
    json_path = config_path_for(path)
    meta = _read_meta(json_path)
    meta["sha256"] = sha256_of(path)
    meta["config_sha256"] = config_sha256(meta)
    _info_from_meta(meta, json_path)
    _write_json(json_path, meta)
    return json_path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_path_for(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_weights(model: torch.nn.Module, info: ModelInfo, path: str | Path) -> Path:
    """Write `path` (.safetensors) and its JSON config beside it; returns the JSON path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path.name}: weights are written as .safetensors; change the file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT})
    return rewrite_info(path, info)


def _read_meta(json_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise WeightsError(f"{json_path.name} is not valid JSON ({str(error)[:120]}); restore it from the "
                           "model's source.") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{json_path.name} holds a JSON {type(meta).__name__}, not a model config object; "
                           "restore it from the model's source.")
    return meta


def read_model_info(path: str | Path) -> tuple[Path, ModelInfo]:
    """Check a weights file against its JSON config (hash, preset, classes) without loading tensors."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"{path.name}: only .safetensors weights are loaded (pickled checkpoints can run code); "
            "export the model with `vldun train`, which writes safetensors."
        )
    json_path = config_path_for(path)
    for needed in (path, json_path):
        if not needed.is_file():
            raise WeightsError(f"{needed} is missing; a VLDUN model is a .safetensors file with its .json beside it.")
    meta = _read_meta(json_path)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{json_path.name}: format {meta.get('format')!r} is not {FORMAT!r}; re-export the model.")
    actual = sha256_of(path)
    if actual != meta.get("sha256"):
        raise WeightsError(
            f"{path.name}: SHA-256 {actual[:12]}… does not match {json_path.name} ({str(meta.get('sha256'))[:12]}…). "
            "The file is corrupted or was replaced; download or copy the model again."
        )
    try:
        sealed = config_sha256(meta)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{json_path.name} holds values JSON cannot seal ({error}).") from None
    if meta.get("config_sha256") != sealed:
        found = meta.get("config_sha256")
        raise WeightsError(
            f"{json_path.name}: its content does not match its config_sha256 "
            + ("(none recorded)" if found is None else f"({str(found)[:12]}… recorded, {sealed[:12]}… now)")
            + ": the config was edited or belongs to other weights. Copy the model again, or, if the edit was "
            "intended, re-seal it with VLDUNLib.weights.reseal(path)."
        )
    info = _info_from_meta(meta, json_path)
    return path, info


def _info_from_meta(meta: dict[str, Any], json_path: Path) -> ModelInfo:
    try:
        return _checked_info(meta, json_path)
    except WeightsError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise WeightsError(f"{json_path.name}: malformed model config ({type(error).__name__}: {error}).") from None


def _checked_info(meta: dict[str, Any], json_path: Path) -> ModelInfo:
    config_data = meta.get("config") or {}
    if not isinstance(config_data, dict):
        raise WeightsError(f"{json_path.name}: 'config' must be an object, got {type(config_data).__name__}.")
    preset = config_data.get("preset")
    if preset not in PRESETS:
        raise WeightsError(f"{json_path.name}: unknown preset {preset!r}; this VLDUN knows {sorted(PRESETS)}.")
    try:
        config = VLDUNConfig.from_dict(config_data)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{json_path.name}: invalid model config ({error}).") from error
    classes = list(meta.get("classes") or [])
    if config.seg_head and len(classes) != config.num_classes:
        raise WeightsError(
            f"{json_path.name}: {len(classes)} class names for a head of {config.num_classes} classes; "
            "the config is incomplete or belongs to other weights."
        )
    dataset_classes = {k: [int(i) for i in v] for k, v in (meta.get("dataset_classes") or {}).items()}
    bad = [i for v in dataset_classes.values() for i in v if not 0 < i < config.num_classes]
    if bad:
        raise WeightsError(f"{json_path.name}: dataset class indices {bad} are outside the head's classes.")
    train_size = meta.get("train_size")
    if train_size is not None and (not isinstance(train_size, int) or isinstance(train_size, bool) or train_size < 16):
        raise WeightsError(f"{json_path.name}: train_size must be a whole number of pixels >= 16 or null, "
                           f"got {train_size!r}.")
    ood = float(meta.get("ood_threshold", 0.5))
    segment_native = meta.get("segment_native", False)
    if not isinstance(segment_native, bool):
        raise WeightsError(f"{json_path.name}: segment_native must be true or false, got {segment_native!r}.")
    try:
        tasks = {k: Task.from_dict(v) for k, v in (meta.get("tasks") or {}).items()}
        statistics = NearestNeighbourOOD.from_dict(meta["ood"]) if meta.get("ood") else None
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{json_path.name}: invalid tasks or ood statistics ({error}).") from error
    bad = [i for t in tasks.values() for i in t.classes if not 0 < i < config.num_classes]
    if bad:
        raise WeightsError(f"{json_path.name}: task class indices {bad} are outside the head's classes.")
    if statistics and (not config.use_prior or statistics.references.shape[1] != config.prior.embed_dim):
        raise WeightsError(f"{json_path.name}: ood references of length {statistics.references.shape[1]} do not fit "
                           f"this model's prior (embedding length {config.prior.embed_dim}, use_prior "
                           f"{config.use_prior}); recalibrate with `vldun calibrate-ood --weights WEIGHTS --write`.")
    return ModelInfo(config, classes, dataset_classes, ood, train_size, meta.get("extra", {}),
                     dict(meta.get("modality_names") or {}), tasks, statistics, segment_native)


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelInfo]:
    """A verified model in eval mode; `path=None` loads the shipped default weights."""
    from .network import build_model

    path, info = read_model_info(path or DEFAULT_WEIGHTS)
    model = build_model(info.config)
    expected = model.state_dict()
    try:
        state = _read_tensors(path, expected)
    except WeightsError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError for a corrupt header
        raise WeightsError(f"{path.name} could not be read as safetensors ({error}); copy the model again.") from None
    model.load_state_dict(state)
    return model.to(device).eval(), info


def _read_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        keys = set(handle.keys())
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing or unexpected:
            raise WeightsError(
                f"{path.name} does not match its config: {len(missing)} missing and {len(unexpected)} unexpected "
                f"tensors (e.g. {(missing + unexpected)[:3]})."
            )
        state = {}
        for key in keys:
            tensor = handle.get_tensor(key)
            if tensor.shape != expected[key].shape:
                raise WeightsError(
                    f"{path.name}: tensor {key} has shape {tuple(tensor.shape)}, the config needs "
                    f"{tuple(expected[key].shape)}; the config belongs to other weights."
                )
            state[key] = tensor
    return state
