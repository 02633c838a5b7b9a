"""Smoke test of the systemd test container: it boots, runs a unit that writes to the host, stops."""

from __future__ import annotations

from pathlib import Path

import pytest
from systemd_container import READY_STATES, SystemdContainer, unavailable_reason

UNIT = """\
[Unit]
Description=systemd_container smoke test

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo written by smoke.service >> {out}'
ExecStart=/bin/echo printed by smoke.service
"""


def test_boots_runs_a_oneshot_unit_and_stops(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    shared = tmp_path / "shared"
    shared.mkdir()
    out = shared / "out.txt"
    with SystemdContainer(tmp_path / "containers", binds=[shared]) as container:
        state = container.systemctl("is-system-running", check=False).stdout.strip()
        assert state in READY_STATES
        container.write_file("/etc/systemd/system/smoke.service", UNIT.format(out=out))
        container.systemctl("daemon-reload")
        container.systemctl("start", "smoke.service")  # a oneshot: returns when it has run
        assert out.read_text() == "written by smoke.service\n"
        assert container.show("smoke.service", "Result") == "success"
        container.wait_for(
            lambda: (
                "printed by smoke.service"
                in container.journal("-u", "smoke.service", "-o", "cat", "_TRANSPORT=stdout")
            ),
            timeout=5,
            what="the unit's stdout in the journal",
        )
        nspawn, pid1 = container.nspawn_pid, container.pid1
        container.stop()
        assert not Path(f"/proc/{nspawn}").exists()
        assert not Path(f"/proc/{pid1}").exists()
    assert [p.name for p in (tmp_path / "containers").iterdir() if p.is_dir()] == []  # root dir removed
