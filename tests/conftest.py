from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import Receiver, train_dictionary


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests (and the processes they start) must not see this machine's
    /etc/cis490/reconcile.toml, state directory, CIS490_RECONCILE_* variables
    or a systemd NOTIFY_SOCKET: point the config at an empty file, switch the
    state off and drop the rest. TMPDIR too: a pass without a state directory
    keeps a temporary one there, which a pass the tests kill -9 cannot
    remove; under pytest's base directory, pytest prunes them."""
    for name in list(os.environ):
        if name.startswith("CIS490_RECONCILE_") or name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            monkeypatch.delenv(name)
    empty = tmp_path_factory.getbasetemp() / "empty-config.toml"
    empty.touch()
    monkeypatch.setenv("CIS490_RECONCILE_CONFIG", str(empty))
    monkeypatch.setenv("CIS490_RECONCILE_STATE_DIR", "")  # tests that want state pass --state-dir
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver(tmp_path)


@pytest.fixture(scope="session")
def dictionary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zstd dictionary trained by `zstd --train`, as a fleet would make one."""
    return train_dictionary(tmp_path_factory.mktemp("dict"))


def pytest_configure(config: pytest.Config) -> None:
    for tool in ("tar", "zstd"):
        if shutil.which(tool) is None:
            raise pytest.UsageError(f"the tests need GNU {tool} on PATH (apt-get install {tool})")
