"""`vldun ship`: only a finished recipe's weights, trained by committed code, become the shipped model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from model_factory import tiny_predictor
from vldun_lab.ship import (
    PROVENANCE_BEGIN,
    PROVENANCE_END,
    REPOSITORY,
    ship,
    shipping_problems,
)
from VLDUNLib.ood import NearestNeighbourOOD
from VLDUNLib.weights import read_model_info, save_weights, sha256_of

HEAD = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True,
                      check=False).stdout.strip()
pytestmark = pytest.mark.skipif(not HEAD, reason="needs the repository's git history")


def finished_info(**extra):
    """A tiny model's info as a finished run of recipes/vldun_compact.yaml would record it."""
    predictor = tiny_predictor()
    info = predictor.info
    info.ood = NearestNeighbourOOD(np.eye(info.config.prior.embed_dim)[:2], threshold=0.1)
    info.extra = {"recipe": "recipes/vldun_compact.yaml", "run": {"joint": {"steps": 8000}},
                  "sessions": [{"started": "2026-12-06T04:00:00Z", "machine": "cpu", "code": HEAD,
                                "from": ["prior", 0], "to": ["joint", 8000], "seconds": 60.0}], **extra}
    return predictor.model, info


def test_a_finished_recipe_run_of_committed_code_may_be_shipped():
    assert shipping_problems(finished_info()[1]) == []


@pytest.mark.parametrize(("change", "problem"), [
    ({"interim": {"stage": "joint", "step": 300, "of": 8000}}, "interim weights"),
    ({"recipe": "my_run.yaml"}, "not by a recipe of this repository"),
    ({"recipe": "recipes/missing.yaml"}, "not by a recipe of this repository"),
    ({"sessions": []}, "no training session"),
])
def test_weights_no_finished_recipe_made_are_refused(change, problem):
    assert any(problem in p for p in shipping_problems(finished_info(**change)[1]))


@pytest.mark.parametrize(("code", "to", "problem"), [
    (f"{HEAD}+changes", ["joint", 8000], "uncommitted code"),
    ("0123456789ab", ["joint", 8000], "not in this repository's history"),
    (HEAD, ["joint", 4000], "not at the recipe's last step"),
])
def test_a_session_of_uncommitted_code_or_an_unfinished_run_is_refused(code, to, problem):
    _, info = finished_info()
    info.extra["sessions"][0].update(code=code, to=to)
    assert any(problem in p for p in shipping_problems(info))


def test_shipping_copies_the_weights_and_writes_the_card(tmp_path):
    model, info = finished_info()
    weights = tmp_path / "run" / "model.safetensors"
    save_weights(model, info, weights)
    shipped = tmp_path / "Models" / "vldun_compact.safetensors"
    old_model, old_info = finished_info(recipe="old")
    next(old_model.parameters()).data += 1
    save_weights(old_model, old_info, shipped)  # what was shipped before
    old = sha256_of(shipped)
    (shipped.parent / "MODEL_CARD.md").write_text(f"# Card\nSHA-256 `{old}`\n{PROVENANCE_BEGIN}\nnone\n{PROVENANCE_END}\nrest\n")
    ship(weights, shipped)
    assert shipped.read_bytes() == weights.read_bytes() and read_model_info(shipped)[1].extra["recipe"] == info.extra["recipe"]
    card = (shipped.parent / "MODEL_CARD.md").read_text()
    assert f"SHA-256 `{sha256_of(weights)}`" in card and old not in card and "rest" in card
    assert "Trained by `vldun train recipes/vldun_compact.yaml` in 1 session(s)" in card and "\nnone\n" not in card


def test_refused_weights_change_nothing(tmp_path):
    model, info = finished_info(interim={"stage": "joint", "step": 1, "of": 8000})
    weights = tmp_path / "interim.safetensors"
    save_weights(model, info, weights)
    shipped = tmp_path / "Models" / "vldun_compact.safetensors"
    with pytest.raises(ValueError, match="cannot be shipped:\n  - they are interim weights"):
        ship(weights, shipped)
    assert not shipped.parent.exists()


def test_the_shipped_card_has_a_provenance_block():
    card = (REPOSITORY / "VLDUN" / "Resources" / "Models" / "MODEL_CARD.md").read_text()
    assert card.index(PROVENANCE_BEGIN) < card.index(PROVENANCE_END)


def test_the_code_version_names_the_commit_and_any_change_to_the_model_lab_or_recipes():
    from vldun_lab.train import code_version

    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "VLDUN/VLDUNLib",
                            "lab/vldun_lab", "recipes"], cwd=REPOSITORY, capture_output=True, text=True, check=False).stdout.strip()
    assert code_version() == HEAD + ("+changes" if dirty else "")


def test_a_failed_copy_leaves_the_old_model_whole(tmp_path, monkeypatch):
    from vldun_lab import ship as ship_module

    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"old"), new.write_bytes(b"new")
    target = tmp_path / "shipped.bin"
    target.write_bytes(b"old")
    real_copy = ship_module.shutil.copyfile
    monkeypatch.setattr(ship_module.shutil, "copyfile", lambda a, b: real_copy(a, b) if a == new else Path(b).write_bytes(b"x"))
    with pytest.raises(OSError, match="did not give the same bytes"):
        ship_module.copy_checked([(new, target), (old, tmp_path / "other.bin")])
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["new.bin", "old.bin", "shipped.bin"]
