"""VLDUNLib.allocator: the `vldun` process keeps freed memory instead of faulting it in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from VLDUNLib import allocator

FAULTS = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    if sys.argv[1] == "tuned":
        from VLDUNLib.allocator import keep_freed_memory
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def layer():  # three 24 MiB tensors alive at once, then freed, as in a network's layer
        held = [np.ones(3 << 20) for _ in range(3)]
        return sum(float(a[-1]) for a in held)
    layer()
    before = faults()
    for _ in range(5):
        layer()
    print(json.dumps(faults() - before))
""")


def minor_faults(mode: str) -> int:
    """Minor page faults of five rounds of `layer()` in a fresh process, `plain` or `tuned`."""
    env = {**os.environ, "PYTHONPATH": str(Path(allocator.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    """glibc's defaults give part of each round's 72 MiB back and fault it in again; tuned, it stays."""
    plain, tuned = minor_faults("plain"), minor_faults("tuned")
    assert plain > 1000 and tuned * 10 < plain, (plain, tuned)


def test_other_systems_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
