"""The lab's tests share the product suite's fixtures (loaded under their own module name) and model factory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PRODUCT_TESTS = Path(__file__).resolve().parents[2] / "VLDUN" / "Testing" / "Python"
sys.path.insert(0, str(PRODUCT_TESTS))

_spec = importlib.util.spec_from_file_location("vldun_product_conftest", PRODUCT_TESTS / "conftest.py")
_product = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_product)
globals().update({name: value for name, value in vars(_product).items() if not name.startswith("__")})


import pytest  # noqa: E402
from VLDUNLib import ssm  # noqa: E402


@pytest.fixture(autouse=True)
def _pytorch_scan_after_each_test():
    """A Trainer routes CPU scans through the compiled kernel for its process; every test starts and ends without it."""
    ssm.use_cpu_scan(None)
    yield
    ssm.use_cpu_scan(None)
