"""A real systemd, booted in a throwaway container, for tests that need units, timers and the journal.

PID 1 on the test machines is not systemd, so a test that wants to see how systemd really runs a
unit boots one with systemd-nspawn (apt-get install systemd-container). The recipe, as root: inside
``unshare --mount --propagation private`` mount a tmpfs on /run/systemd and
bind-mount / onto an empty directory D (``--volatile=overlay`` is refused on / itself), then exec
``systemd-nspawn -D D --volatile=overlay --boot --register=no --keep-unit ...``. The container sees
the host tree through an overlay: writes inside vanish at stop, its /tmp is private, so host paths
under /tmp (pytest's tmp_path) must be passed as binds. machinectl and ``systemctl -M`` do not work
here; the container is driven with ``nsenter -t PID1 -a``.

Lifetime. The process started is systemd-nspawn itself (unshare and sh exec into it), in its own
session, so SIGTERM to it is a clean poweroff of the container and SIGKILL to its process group is
the last resort. A container would outlive a killed test process, so the child gets
PR_SET_PDEATHSIG=SIGTERM (prctl through ctypes, in preexec_fn, before exec of unshare); a parent
that died between fork and prctl is caught by re-checking getppid() in the child.

What was seen here (Debian 12, systemd 252), checked by hand:
- kill -9 of a python process that had started a container: nspawn got SIGTERM, the container's
  PID 1 was gone 0.2 s later and nspawn exited; nothing was left. The setting survives the exec
  chain unshare -> sh -> systemd-nspawn (none is set-user-ID) and nspawn does not reset it.
  Without it, nspawn and the container ran on, reparented to PID 1.
- The orphaned nspawn then stays a zombie for about 2 s until this machine's PID 1 reaps it, so
  ``kill -0`` or pgrep say "still there" for that long; stop() (which reaps it) takes 0.1 s.
- The signal comes when the *thread* that started the container ends, not the process: a container
  started from a short-lived thread was powered off 0.1 s after that thread returned. Start
  containers from pytest's main thread.
- SIGKILL to nspawn leaves the container's PID 1 running, so stop() kills PID 1 too if need be.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

SYSTEMD = Path("/usr/lib/systemd/systemd")
TOOLS = ("systemd-nspawn", "nsenter", "unshare")
READY_STATES = ("running", "degraded")
PR_SET_PDEATHSIG = 1
# Commands inside get this environment, not the host's (a venv on the host PATH means nothing there).
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
# Run by sh inside the new mount namespace: $1 is the empty root directory, the rest nspawn's arguments.
LAUNCH = (
    "set -e; mkdir -p /run/systemd; mount -n -t tmpfs tmpfs /run/systemd; "
    'mount -n --bind / "$1"; shift; exec systemd-nspawn "$@"'
)

_libc = ctypes.CDLL(None, use_errno=True)


class ContainerError(RuntimeError):
    """The container did not boot, or died under a test."""


def unavailable_reason() -> str | None:
    """Why a container cannot boot here, or None; tests skip with this reason."""
    if os.geteuid() != 0:
        return "booting a systemd container needs root (systemd-nspawn, unshare, mount)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH: apt-get install systemd-container util-linux"
    if not SYSTEMD.is_file():
        return f"{SYSTEMD} missing: apt-get install systemd"
    return None


def _bind_option(bind: str | Path) -> str:
    """--bind= for a host path (same path inside) or a "SRC:DST" string, as nspawn spells it."""
    text = str(bind)
    if isinstance(bind, str) and ":" in text:
        return f"--bind={text}"
    return f"--bind={os.path.abspath(text)}"


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM the child (nspawn, after the execs) when the starting thread dies."""

    def preexec() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # the parent died before prctl: nobody would ever signal us
            os._exit(1)

    return preexec


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat, so a recycled PID is not taken for our container's PID 1."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class SystemdContainer:
    """One booted systemd in a volatile overlay of the host; stop it in a finalizer, always."""

    def __init__(self, workdir: Path, binds: Sequence[str | Path] = ()) -> None:
        self.workdir = Path(workdir)
        self.binds = list(binds)
        self.pid1: int | None = None
        self.root: Path | None = None
        self.log: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid1_start: str | None = None

    # -- lifetime -----------------------------------------------------------------------------

    @property
    def nspawn_pid(self) -> int | None:
        """PID of systemd-nspawn, or None before start."""
        return None if self._proc is None else self._proc.pid

    def start(self, timeout: float = 60) -> SystemdContainer:
        """Boot and wait until is-system-running says running or degraded; on failure clean up."""
        if self._proc is not None:
            raise ContainerError("container already started")
        reason = unavailable_reason()
        if reason is not None:
            raise ContainerError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="systemd-root-", dir=self.workdir))
        self.log = self.root.with_name(self.root.name + ".log")
        nspawn_args = [
            "-q",
            f"--directory={self.root}",
            "--volatile=overlay",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--console=read-only",
            "--link-journal=no",
            *(_bind_option(bind) for bind in self.binds),
            "--",
            "systemd.firstboot=off",
            "systemd.unit=basic.target",
        ]
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", LAUNCH, "sh", str(self.root)]
        deadline = time.monotonic() + timeout
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [*argv, *nspawn_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        try:
            self.pid1 = self._find_pid1(deadline)
            self._pid1_start = _start_time(self.pid1)
            self._wait_running(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _find_pid1(self, deadline: float) -> int:
        """The container's PID 1: the child of nspawn that has exec'd systemd."""
        assert self._proc is not None
        tasks = Path(f"/proc/{self._proc.pid}/task")
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                for task in tasks.iterdir():
                    for child in (task / "children").read_text().split():
                        with contextlib.suppress(OSError):
                            if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                                return int(child)
            time.sleep(0.01)
        raise ContainerError(f"no systemd child of systemd-nspawn appeared\n{self.log_tail()}")

    def _wait_running(self, deadline: float) -> None:
        """Poll is-system-running --wait; it fails while the manager's socket is not up yet."""
        last = ""
        while (left := deadline - time.monotonic()) > 0:
            self._check_alive()
            try:
                proc = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left)
            except subprocess.TimeoutExpired:
                break
            last = (proc.stdout + proc.stderr).strip()
            if proc.stdout.strip() in READY_STATES:
                return
            time.sleep(0.05)
        raise ContainerError(f"systemd did not reach running/degraded, last: {last!r}\n{self.log_tail()}")

    def _check_alive(self) -> None:
        """Fail fast, with nspawn's own words, when the container is gone."""
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise ContainerError(f"systemd-nspawn is not running (exit {code})\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM nspawn (a clean poweroff), SIGKILL its group after timeout; safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # A SIGKILLed nspawn leaves PID 1 running (seen here), and PID 1 takes the whole namespace with it.
        if self._pid1_alive():
            assert self.pid1 is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
            end = time.monotonic() + 10
            while self._pid1_alive() and time.monotonic() < end:
                time.sleep(0.01)
        if self.root is not None:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # empty again once the mount namespace is gone
            with contextlib.suppress(OSError):  # nspawn's image lock, left behind when it was killed
                self.root.with_name(f".#{self.root.name}.lck").unlink()

    def _pid1_alive(self) -> bool:
        """Our PID 1 still exists (same PID and start time, so not a recycled PID)."""
        if self.pid1 is None or self._pid1_start is None:
            return False
        return _start_time(self.pid1) == self._pid1_start

    def __enter__(self) -> SystemdContainer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- driving it ---------------------------------------------------------------------------

    def run(
        self, *argv: str | Path, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside (all of PID 1's namespaces, a clean environment); capture its output."""
        if self.pid1 is None:
            raise ContainerError("container not started")
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "--", *map(str, argv)]
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=INSIDE_ENV,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise ContainerError(
                f"{' '.join(map(str, argv))} exited {proc.returncode} in the container\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """systemctl inside; check=False for is-active and friends, whose exit code is the answer."""
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit, as systemctl show -P prints it (Result, ActiveState, NRestarts)."""
        return self.run("systemctl", "show", "-P", prop, "--", unit).stdout.rstrip("\n")

    def journal(self, *args: str) -> str:
        """journalctl inside, e.g. journal("-u", unit, "-o", "cat", "_TRANSPORT=stdout")."""
        return self.run("journalctl", "--no-pager", *args).stdout

    def write_file(self, path_inside: str | Path, text: str) -> None:
        """Write a file inside (into the overlay: gone at stop), creating parent directories.

        Done by sh inside, so symlinks resolve as the container sees them. Unit files need
        ``systemctl("daemon-reload")`` afterwards.
        """
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
        self.run("sh", "-c", script, "sh", str(path_inside), input=text)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll predicate until true; on timeout fail with what, its last result and the journal tail.

        Exceptions from predicate count as "not yet" (a file that is not written yet), and show up
        in the failure. A dead container fails at once.
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            self._check_alive()
            try:
                result = predicate()
            except Exception as exc:
                last = exc
            else:
                if result:
                    return
                last = result
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        tail = self.run("journalctl", "--no-pager", "-n", "30", check=False).stdout
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}\n{tail}")

    def log_tail(self, lines: int = 40) -> str:
        """The end of nspawn's own output (console of the container, nspawn's errors)."""
        if self.log is None:
            return "(no log)"
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "nspawn log tail:\n" + "\n".join(text.splitlines()[-lines:])
