"""A real node_exporter and a real Prometheus for tests/test_alerts.py.

The alert rules are only proven if the components that run them in
production run them here: node_exporter's textfile collector reading the
file a pass wrote, Prometheus scraping it and evaluating the shipped rules.
Each daemon runs in its own session (process group), so stopping it, or
cleaning up after a failed test, kills everything it started; nothing is
left listening or running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from helpers import REPO

ALERTS = REPO / "cis490_reconcile" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "tests" / "prometheus" / "alerts_test.yml"

# Debian names node_exporter prometheus-node-exporter; upstream tarballs node_exporter.
BINARIES = {
    "promtool": ("promtool",),
    "prometheus": ("prometheus",),
    "node_exporter": ("prometheus-node-exporter", "node_exporter"),
}
APT_PACKAGES = "prometheus prometheus-node-exporter"  # promtool comes with prometheus

T = TypeVar("T")


def binary(name: str) -> str | None:
    """The path of a BINARIES tool, or None when it is not installed."""
    for candidate in BINARIES[name]:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def missing_binaries(*names: str) -> str | None:
    """A skip reason naming the tools that are missing, or None."""
    missing = [BINARIES[n][0] for n in names if binary(n) is None]
    if not missing:
        return None
    return f"{', '.join(missing)} not installed (apt-get install {APT_PACKAGES})"


# --- durations ----------------------------------------------------------------

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_FOR_LINE = re.compile(r"^(?P<indent>[ \t]+)for: (?P<duration>\S+)[ \t]*$", re.MULTILINE)


def duration_ms(text: str) -> int:
    """A Prometheus duration ("1h30m", "90s", "0m") in milliseconds."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNITS_MS[u] for n, u in parts)


def shorten_for(rules: str, factor: int) -> str:
    """The rules file with every `for:` divided by `factor` (in whole
    milliseconds). Only the `for:` keys change: expressions, range windows
    and thresholds stay as shipped, so what an end-to-end run proves is the
    shipped expressions; the shipped durations are covered in simulated time
    by tests/prometheus/alerts_test.yml."""

    def shorter(m: re.Match[str]) -> str:
        return f"{m['indent']}for: {duration_ms(m['duration']) // factor}ms"

    return _FOR_LINE.sub(shorter, rules)


def rule_durations(rules: str) -> dict[str, float]:
    """Alert name -> its `for:` in seconds (0 when it has none), read from the
    text of a rules file in the layout alerts.yml uses (one `- alert:` per
    rule, its keys indented below it)."""
    found: dict[str, float] = {}
    for block in re.split(r"(?m)^[ \t]+- alert: ", rules)[1:]:
        name, _, body = block.partition("\n")
        m = _FOR_LINE.search(body)
        found[name.strip()] = duration_ms(m["duration"]) / 1000 if m else 0.0
    return found


# --- processes ------------------------------------------------------------------


def free_port() -> int:
    """A localhost TCP port free right now (the daemon binds it a moment
    later; Daemon.start retries if someone took it meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


class Daemon:
    """One long-running process in its own process group, its output in a
    log file. stop() kills the whole group and is safe to call twice."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: Sequence[str], ready_url: str, timeout: float = 20.0) -> None:
        """Start it and wait until `ready_url` answers 200; raise with the
        log's tail if it exits or never gets ready."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonExited(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                http_get(ready_url, timeout=0.5)
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} not ready at {ready_url} within {timeout} s:\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL if it has not exited in `timeout`;
        then SIGKILL to the group again for any child left behind."""
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5.0)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class DaemonExited(RuntimeError):
    pass


def start_on_free_port(daemon: Daemon, argv: Callable[[int], list[str]], ready: Callable[[int], str]) -> int:
    """Start `daemon` on a free port, again on another if the port was taken
    between free_port() and the bind; return the port."""
    for attempt in range(3):
        port = free_port()
        try:
            daemon.start(argv(port), ready(port))
            return port
        except DaemonExited:
            if attempt == 2 or "address already in use" not in daemon.log_tail():
                raise
    raise AssertionError("unreachable")


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
rule_files:
  - {rules}
scrape_configs:
  - job_name: node
    static_configs:
      - targets: ["127.0.0.1:{exporter_port}"]
"""


class PrometheusStack:
    """node_exporter (textfile collector only) reading `textfile_dir`, and
    Prometheus scraping it and evaluating `rules`, both every `interval`."""

    def __init__(self, workdir: Path, rules: Path, textfile_dir: Path, interval: str = "1s") -> None:
        self.workdir = workdir
        self.rules = rules
        self.textfile_dir = textfile_dir
        self.interval = interval
        workdir.mkdir(parents=True, exist_ok=True)
        self.exporter = Daemon("node_exporter", workdir / "node_exporter.log")
        self.prometheus = Daemon("prometheus", workdir / "prometheus.log")
        self.exporter_port = 0
        self.port = 0

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.exporter_port}"

    def start(self) -> None:
        exporter, prometheus = binary("node_exporter"), binary("prometheus")
        assert exporter is not None and prometheus is not None
        self.exporter_port = start_on_free_port(
            self.exporter,
            lambda port: [
                exporter,
                f"--web.listen-address=127.0.0.1:{port}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={self.textfile_dir}",
            ],
            lambda port: f"http://127.0.0.1:{port}/metrics",
        )
        config = self.workdir / "prometheus.yml"
        config.write_text(
            PROMETHEUS_CONFIG.format(
                interval=self.interval, rules=json.dumps(str(self.rules)), exporter_port=self.exporter_port
            )
        )
        self.port = start_on_free_port(
            self.prometheus,
            lambda port: [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            lambda port: f"http://127.0.0.1:{port}/-/ready",
        )

    def stop(self) -> None:
        """Prometheus first (it would otherwise log failed scrapes), then
        node_exporter; each whole process group."""
        try:
            self.prometheus.stop()
        finally:
            self.exporter.stop()

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        answer = json.loads(http_get(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}"))
        assert answer["status"] == "success", answer
        return answer["data"]

    def alerts(self) -> dict[str, str]:
        """Active alerts of our instance: alert name -> "pending" or "firing".
        Resolved alerts are not listed."""
        return {
            a["labels"]["alertname"]: a["state"]
            for a in self.api("alerts")["alerts"]
            if a["labels"].get("instance") == self.instance
        }

    def query(self, expr: str) -> list[float]:
        """The values of an instant query."""
        return [float(r["value"][1]) for r in self.api("query", query=expr)["result"]]

    def alert_rules(self) -> list[dict[str, Any]]:
        return [r for g in self.api("rules", type="alert")["groups"] for r in g["rules"]]


def wait_until(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll `check` until it returns something other than None (or False);
    return that. Fails the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
