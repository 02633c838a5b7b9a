from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import Receiver


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver(tmp_path)


def pytest_configure(config: pytest.Config) -> None:
    for tool in ("tar", "zstd"):
        if shutil.which(tool) is None:
            raise pytest.UsageError(f"the tests need GNU {tool} on PATH (apt-get install {tool})")
