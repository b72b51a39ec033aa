"""The test modules of tests/conftest.py's OWN_PROCESS_MODULES, each in a pytest process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OWN_PROCESS_ENV, OWN_PROCESS_MODULES


@pytest.mark.parametrize("module", OWN_PROCESS_MODULES)
def test_module_passes_in_its_own_process(module):
    path = Path(__file__).with_name(module)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
        env={**os.environ, OWN_PROCESS_ENV: "1"}, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
