"""Start a model for training from verified weights of another (fine-tuning, a new head, a tuned prior)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from VLDUNLib.weights import WeightsError, read_model_info


def load_matching_weights(model: torch.nn.Module, path: str | Path, modules: list[str] | None = None) -> list[str]:
    """Start `model` from verified weights: copy every tensor whose name and shape match; return the model's others.

    Fine-tuning on new data (other classes, a changed head) keeps what still fits and leaves the rest at its
    fresh initialisation, as nnU-Net does with pretrained weights; the caller reports the list. The model's own
    `adapt_state` (where it has one) maps tensors of an earlier shape onto its layers, so it starts where the
    file ended. `modules` limits the copy to those top-level submodules (["prior"]: a new network on a tuned prior).
    """
    path, _ = read_model_info(path)
    everything = model.state_dict()
    known = {key.split(".")[0] for key in everything}
    if modules is not None and (unknown := sorted(set(modules) - known)):
        raise WeightsError(f"init_modules {unknown} are not parts of this model; choose from {sorted(known)}.")
    chosen = set(modules) if modules is not None else known
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys() if key.split(".")[0] in chosen}
    adapt = getattr(model, "adapt_state", None)
    state = adapt(state) if adapt is not None else state
    state = {key: tensor for key, tensor in state.items()
             if key in everything and key.split(".")[0] in chosen and tensor.shape == everything[key].shape}
    if not state:
        raise WeightsError(f"{path.name} shares no tensor with this model; is it a model of another architecture?")
    model.load_state_dict(state, strict=False)
    return sorted(set(everything) - set(state))
