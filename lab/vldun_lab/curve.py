"""`vldun curve RUN`: a run's losses as means over windows of steps, to see whether a stage is still learning.

It reads the run's `log.csv` (one row per step, written by `vldun train`). A resumed run logs again the steps
it redid after its last checkpoint, so each (stage, step) counts once, with its last row. The recipe's prior
was lengthened from such a table (docs/history-2026-12-05.md, section 11).
"""

from __future__ import annotations

import csv
from argparse import Namespace
from pathlib import Path

LOSSES = ("loss", "rec", "seg", "modality", "degradation")


def read_log(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """Stage -> step -> the losses logged for it (its last row) and its learning rate, in the order stages ran."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give the folder of a run that `vldun train` wrote (its `out:`)")
    stages: dict[str, dict[int, dict[str, float]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(row[k]) for k in (*LOSSES, "lr") if row.get(k) not in (None, "")}
            stages.setdefault(row["stage"], {})[int(row["step"])] = values
    return stages


def windows(log: dict[str, dict[int, dict[str, float]]], every: int) -> list[dict[str, object]]:
    """Per stage and window of `every` steps: the steps logged, the learning rate at its first, each loss's mean."""
    if every < 1:
        raise ValueError(f"--every is a number of steps, at least 1; got {every}")
    rows = []
    for stage, steps in log.items():
        for start in range(0, max(steps) + 1, every):
            logged = [steps[s] for s in range(start, start + every) if s in steps]
            if not logged:
                continue
            means = {k: sum(v[k] for v in logged) / len(logged) for k in LOSSES if all(k in v for v in logged)}
            rows.append({"stage": stage, "steps": f"{start}-{start + every - 1}", "logged": len(logged),
                         "lr": logged[0].get("lr"), **means})
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    losses = [k for k in LOSSES if any(k in r for r in rows)]
    lines = ["| stage | steps | logged | lr | " + " | ".join(losses) + " |", "|---" * (4 + len(losses)) + "|"]
    for r in rows:
        cells = [str(r["stage"]), str(r["steps"]), str(r["logged"]), f"{r['lr']:.3g}" if r["lr"] is not None else "-"]
        cells += [f"{r[k]:.4f}" if k in r else "-" for k in losses]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_command(args: Namespace) -> None:
    print(markdown(windows(read_log(Path(args.run) / "log.csv"), args.every)))
