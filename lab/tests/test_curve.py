"""`vldun curve`: windows of a run's log, each step counted once however often a resume logged it."""

from __future__ import annotations

from pathlib import Path

import pytest
from vldun_lab.curve import markdown, read_log, windows

HEADER = "stage,step,lr,seconds,loss,rec,seg,modality,degradation\n"


def write_log(folder: Path, rows: list[str]) -> Path:
    (folder / "log.csv").write_text(HEADER + "".join(f"{r}\n" for r in rows))
    return folder / "log.csv"


def test_windows_average_each_step_once_with_its_last_row(tmp_path: Path) -> None:
    rows = [f"prior,{s},0.001,1,{s},,,{s / 10},{s}" for s in range(6)]
    rows += ["prior,4,0.001,1,40,,,4,40", "prior,5,0.001,1,50,,,5,50"]  # redone after a resume: these count
    rows += [f"joint,{s},0.002,1,{-s},{-s},1.0,," for s in range(3)]
    table = windows(read_log(write_log(tmp_path, rows)), every=3)
    assert [(r["stage"], r["steps"], r["logged"]) for r in table] == [
        ("prior", "0-2", 3), ("prior", "3-5", 3), ("joint", "0-2", 3)]
    assert table[1]["loss"] == pytest.approx((3 + 40 + 50) / 3) and table[1]["modality"] == pytest.approx((0.3 + 4 + 5) / 3)
    assert "rec" not in table[0] and table[2]["rec"] == pytest.approx(-1.0) and table[2]["lr"] == pytest.approx(0.002)
    text = markdown(table)
    assert text.splitlines()[0] == "| stage | steps | logged | lr | loss | rec | seg | modality | degradation |"
    assert "| prior | 0-2 | 3 | 0.001 | 1.0000 | - | - | 0.1000 | 1.0000 |" in text


def test_a_missing_log_or_window_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give the folder of a run"):
        read_log(tmp_path / "log.csv")
    with pytest.raises(ValueError, match="at least 1"):
        windows({"prior": {0: {"loss": 1.0}}}, 0)
