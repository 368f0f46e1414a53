"""`vldun ship WEIGHTS`: make a finished recipe's export the shipped model, and refuse weights no recipe made.

Every shipped weight must come from a recipe in the repository, trained to its end by committed code. Before
anything is copied the weights are checked (each refusal names the problem and the fix): sealed and intact
(`read_model_info`), not interim (`vldun train --export-checkpoint`), made by a file under `recipes/` that
exists, every training session run by a commit in this repository's history with no uncommitted changes, the
last session ending at the recipe's last joint step, and the unknown-scan statistics present.

Then the .safetensors and its JSON are copied beside the module (each through a temporary file, checked, then
renamed), and the model card's provenance block (between `PROVENANCE_BEGIN` and `PROVENANCE_END`) and its
SHA-256 are rewritten. The card's results tables come from `make report` and stay the author's to update.
"""

from __future__ import annotations

import shutil
import subprocess
from argparse import Namespace
from pathlib import Path

from VLDUNLib.weights import (
    DEFAULT_WEIGHTS,
    ModelInfo,
    config_path_for,
    read_model_info,
    sha256_of,
)

from .train import provenance_table

REPOSITORY = Path(__file__).resolve().parents[2]
PROVENANCE_BEGIN = "<!-- provenance: written by `vldun ship` -->"
PROVENANCE_END = "<!-- /provenance -->"


def in_history(commit: str, repository: Path) -> bool:
    """Whether `commit` is HEAD or one of its ancestors in `repository`."""
    result = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=repository,
                            capture_output=True, timeout=30, check=False)
    return result.returncode == 0


def shipping_problems(info: ModelInfo, repository: Path = REPOSITORY) -> list[str]:
    """Why these weights may not be shipped; empty when they may."""
    extra = info.extra
    problems = []
    if "interim" in extra:
        problems.append(f"they are interim weights of an unfinished run ({extra['interim']}); ship the run's "
                        "model.safetensors once `vldun train RECIPE --resume` has finished")
    recipe = str(extra.get("recipe") or "")
    if not recipe.startswith("recipes/") or not (repository / recipe).is_file():
        problems.append(f"they were made by {recipe or 'no recorded recipe'!r}, not by a recipe of this repository "
                        "(recipes/...); train them with `vldun train recipes/NAME.yaml`")
    sessions = extra.get("sessions") or []
    if not sessions:
        problems.append("no training session is recorded; export them with `vldun train`")
    for session in sessions:
        code = str(session.get("code", "unknown"))
        if code == "unknown" or code.endswith("+changes"):
            problems.append(f"the session started {session.get('started')} ran uncommitted code ({code}); "
                            "commit the code and train again")
        elif not in_history(code, repository):
            problems.append(f"the session started {session.get('started')} ran commit {code}, which is not in this "
                            "repository's history; merge that commit first")
    steps = (extra.get("run") or {}).get("joint", {}).get("steps")
    if sessions and sessions[-1].get("to") != ["joint", steps]:
        problems.append(f"the run ended at {sessions[-1].get('to')}, not at the recipe's last step (joint {steps}); "
                        "finish it with --resume")
    if info.ood is None:
        problems.append("they carry no unknown-scan statistics; run `vldun calibrate-ood --weights WEIGHTS --write`")
    return problems


def copy_checked(pairs: list[tuple[Path, Path]]) -> None:
    """Copy each (source, destination) to a temporary file beside its destination and compare it; only when all are
    there and equal, rename them over the destinations, so a failed copy leaves the old model whole."""
    temporaries = []
    try:
        for source, destination in pairs:
            temporary = destination.with_name(f".partial-{destination.name}")
            temporaries.append(temporary)
            shutil.copyfile(source, temporary)
            if sha256_of(temporary) != sha256_of(source):
                raise OSError(f"copying {source} to {destination} did not give the same bytes; check the disk")
        for temporary, (_, destination) in zip(temporaries, pairs):
            temporary.replace(destination)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def card_with_provenance(card: str, old_sha: str | None, new_sha: str, provenance: str) -> str:
    """The model card with its SHA-256 (`old_sha`, where there was one) and its provenance block replaced."""
    if PROVENANCE_BEGIN not in card or PROVENANCE_END not in card:
        raise ValueError(f"the model card has no provenance block ({PROVENANCE_BEGIN} ... {PROVENANCE_END}); add "
                         "one under Training procedure")
    head, rest = card.split(PROVENANCE_BEGIN, 1)
    _, tail = rest.split(PROVENANCE_END, 1)
    card = head + PROVENANCE_BEGIN + "\n" + provenance.strip() + "\n" + PROVENANCE_END + tail
    return card.replace(old_sha, new_sha) if old_sha else card


def ship(weights: Path, shipped: Path = DEFAULT_WEIGHTS, repository: Path = REPOSITORY) -> Path:
    """Check `weights` and make them the shipped model at `shipped` (and its card, MODEL_CARD.md beside it)."""
    path, info = read_model_info(weights)
    if problems := shipping_problems(info, repository):
        raise ValueError(f"{path} cannot be shipped:\n" + "\n".join(f"  - {p}" for p in problems))
    card_path = shipped.parent / "MODEL_CARD.md"
    old_sha = sha256_of(shipped) if shipped.is_file() else None
    card = card_with_provenance(card_path.read_text(), old_sha, sha256_of(path),
                                provenance_table(info.extra["recipe"], info.extra["sessions"]))
    shipped.parent.mkdir(parents=True, exist_ok=True)
    copy_checked([(path, shipped), (config_path_for(path), config_path_for(shipped))])
    read_model_info(shipped)
    card_path.write_text(card)
    return shipped


def ship_command(args: Namespace) -> None:
    shipped = ship(Path(args.weights))
    print(f"Shipped {args.weights} as {shipped}; MODEL_CARD.md has its SHA-256 and provenance. Now run `make report` "
          "and update the card's and README's results tables, then commit the weights once.")
