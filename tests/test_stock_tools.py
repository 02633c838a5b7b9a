"""Tarballs as shippers make them with the stock tools (GNU tar or bsdtar
piped into the zstd CLI, with the options fleets use, and bsdtar --zstd),
through the real command: what gets a row, what is corrupt, what is
unverifiable, and that only corrupt files are ever quarantined. Also the
memory a pass needs for large zstd windows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import COMMIT, Receiver, gnu_tarball, measure_rss, meta, stock_members, stock_tarball

from cis490_reconcile.syscalls import memory_limit
from cis490_reconcile.verdicts import plan_memory

MiB = 1 << 20


# case -> (extra flags, expected verdict, reason fragment)
CASES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "long27": ((), "indexed", ""),
    "ultra22": ((), "indexed", ""),
    "long31": ((), "unverifiable", "declares a 2.0 GiB window, over max_window (128.0 MiB)"),
    "long31-2G": (("--max-window", "2G"), "indexed", ""),
    "dict": ((), "unverifiable", "which zstd_dictionaries does not name"),
    "dict-configured": (("--zstd-dictionaries", "DICT"), "indexed", ""),
    "long27-cut": ((), "corrupt", "truncated"),
    "sparse-gnu": ((), "indexed", ""),
    "sparse-pax": ((), "indexed", ""),
    "decoy-meta": ((), "indexed", ""),
    "bsdtar-pax": ((), "indexed", ""),
    "bsdtar-zstd": ((), "indexed", ""),
    "bsdtar-zstd-cut": ((), "corrupt", "truncated"),
}


@pytest.mark.parametrize("quarantine", [False, True], ids=["in-place", "quarantine"])
@pytest.mark.parametrize("case", list(CASES))
def test_stock_tool_tarballs(
    receiver: Receiver, tmp_path: Path, dictionary: Path, case: str, quarantine: bool
) -> None:
    flags, expected, reason = CASES[case]
    flags = tuple(str(dictionary) if f == "DICT" else f for f in flags)
    path = receiver.episodes / "h" / f"{case}.tar.zst"
    stock_tarball(case, path, case, dictionary)
    original = path.read_bytes()
    qdir = tmp_path / "quarantine"
    qdir.mkdir()
    qflags = ("--quarantine-dir", str(qdir), "--quarantine-min-age", "0") if quarantine else ()

    result = receiver.run(*flags, *qflags)

    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.one("pass_finished")
    if expected == "indexed":
        (row,) = receiver.rows()
        assert (row["host_id"], row["episode_id"], row["commit"]) == ("h", case, COMMIT)
        assert summary["backfilled"] == 1
    else:
        assert not receiver.index.exists() or receiver.rows() == []
        event = result.one(f"tarball_{expected}")
        assert event["path"] == f"h/{case}.tar.zst" and reason in event["reason"]
        assert (summary["corrupt"], summary["unverifiable"]) == ((1, 0) if expected == "corrupt" else (0, 1))
    moved = quarantine and expected == "corrupt"
    assert path.exists() is not moved
    assert (qdir / "h" / f"{case}.tar.zst").exists() is moved
    if not moved:
        assert path.read_bytes() == original


def test_a_window_this_process_cannot_allocate_is_unreadable_not_corrupt(tmp_path: Path) -> None:
    """zstd --long=27 asks for a 128 MiB window; under an address-space
    limit (LimitAS=, a container's) zstd cannot allocate it. That says
    nothing of the bytes: unreadable (looked at again), never corrupt."""
    (tmp_path / "h").mkdir()
    gnu_tarball(tmp_path / "h" / "e.tar.zst", stock_members("e"), ("--long=27",))
    script = (
        "import resource, sys, zstandard\n"
        "from cis490_reconcile.store import Store\n"
        "from cis490_reconcile.verify import verify_one\n"
        "with Store(sys.argv[1]) as store:\n"
        "    host = store.open_host('h')\n"
        "    with host:\n"
        "        tarball = host.lstat('e')\n"
        "    used = int(open('/proc/self/statm').read().split()[0]) * 4096\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), resource.RLIM_INFINITY))\n"
        "    print(repr(verify_one(store, tarball)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("Unreadable(reason='read: zstd could not allocate its memory"), out.stdout


def test_unverifiable_is_remembered_until_it_or_the_limits_change(receiver: Receiver, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = receiver.episodes / "h" / "big.tar.zst"
    stock_tarball("long31", path, "big", tmp_path)
    size = path.stat().st_size
    receiver.tarball("h", "ok")
    receiver.append_row(receiver.receiver_row("h", "ok"))

    first = receiver.run("--state-dir", str(state))
    assert first.one("pass_finished")["unverifiable"] == 1
    assert first.one("pass_finished")["bytes_read"] == size

    again = receiver.run("--state-dir", str(state))  # unchanged: counted, not read, not warned again
    summary = again.one("pass_finished")
    assert (summary["unverifiable"], summary["bytes_read"]) == (1, 0)
    assert again.named("tarball_unverifiable") == []

    os.utime(path)  # touched: it may be another file now, so it is read again
    touched = receiver.run("--state-dir", str(state))
    assert touched.one("pass_finished")["bytes_read"] == size
    assert touched.one("tarball_unverifiable")["path"] == "h/big.tar.zst"

    raised = receiver.run("--state-dir", str(state), "--max-window", "2G")  # other limits: read again
    assert raised.one("pass_finished")["backfilled"] == 1
    assert receiver.keys() == [("h", "ok"), ("h", "big")]


def test_corrupt_file_is_left_in_place_until_quarantine_min_age(receiver: Receiver, tmp_path: Path) -> None:
    """A receiver that writes in place and stalls leaves a file that looks
    cut short: it is reported at once, but moved only once it has stayed
    unchanged for quarantine_min_age."""
    qdir = tmp_path / "quarantine"
    qdir.mkdir()
    path = receiver.episodes / "h" / "stalled.tar.zst"
    stock_tarball("long27-cut", path, "stalled", tmp_path)
    flags = ("--quarantine-dir", str(qdir), "--quarantine-min-age", "3")

    early = receiver.run(*flags)
    event = early.one("tarball_corrupt")
    assert 0 < event["quarantine_in_s"] <= 3
    assert early.named("tarball_quarantined") == [] and path.exists()

    default = receiver.run("--quarantine-dir", str(qdir))  # the default waits an hour
    assert default.one("tarball_corrupt")["quarantine_in_s"] > 3500 and path.exists()

    time.sleep(max(0.0, 3.2 - (time.time() - path.stat().st_ctime)))
    late = receiver.run(*flags)
    assert late.one("tarball_quarantined")["path"] == "h/stalled.tar.zst"
    assert not path.exists() and (qdir / "h" / "stalled.tar.zst").exists()


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 256 MiB tarballs with a 128 MiB window (zstd --long=27) and the
    same two with zstd's default 2 MiB window."""
    root = tmp_path_factory.mktemp("big")
    src = root / "src" / "ep"
    src.mkdir(parents=True)
    subprocess.run(["head", "-c", "256M", "/dev/urandom"], stdout=(src / "frames.bin").open("wb"), check=True)
    (src / "meta.json").write_bytes(meta())
    stores = []
    for name, level in (("long", ("--long=27", "-1")), ("small", ("-1",))):
        store = root / name
        (store / "episodes" / "h").mkdir(parents=True)
        first = store / "episodes" / "h" / "ep.tar.zst"
        tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(src.parent), "ep"], stdout=subprocess.PIPE)
        subprocess.run(["zstd", "-q", *level, "-o", str(first)], stdin=tar.stdout, check=True)
        assert tar.wait() == 0
        os.link(first, store / "episodes" / "h" / "ep2.tar.zst")
        stores.append(store)
    return stores[0], stores[1]


@pytest.mark.parametrize("kind", ["long", "small"])
def test_peak_rss_follows_the_declared_window(big_store: tuple[Path, Path], kind: str) -> None:
    """Two workers, two 256 MiB tarballs: with 128 MiB windows the budget lets
    one window be decoded at a time, so the pass stays within 128 MiB + 64 MiB
    per worker; small windows stay where they always were."""
    store = big_store[0] if kind == "long" else big_store[1]
    index = store / "index.jsonl"
    index.unlink(missing_ok=True)
    argv = ["--once", "--episodes-root", str(store / "episodes"), "--index", str(index), "--min-age", "0"]
    result, peak_process, peak_pass = measure_rss([*argv, "--workers", "2"])
    assert result.returncode == 0, result.stderr
    assert result.one("pass_finished")["backfilled"] == 2
    print(
        f"{kind}: peak RSS of one process {peak_process / MiB:.1f} MiB, of the pass {peak_pass / MiB:.1f} MiB"
    )
    if kind == "long":
        assert peak_process <= 128 * MiB + 64 * MiB
        assert peak_pass <= 128 * MiB + 2 * 64 * MiB
    else:
        assert peak_process <= 64 * MiB


@pytest.mark.parametrize(
    ("workers", "max_window", "limit", "expected"),
    [
        (4, 128 * MiB, None, (4, 128 * MiB, "max_window")),
        (2, 128 * MiB, 512 * MiB, (2, 128 * MiB, "max_window")),  # the shipped unit: 3 * 64 + 128 fits
        (8, 128 * MiB, 512 * MiB, (5, 128 * MiB, "max_window")),  # fewer workers first
        (2, 2048 * MiB, 512 * MiB, (1, 384 * MiB, "the memory limit of 512 MiB")),  # then a smaller window
        (1, 128 * MiB, 100 * MiB, (1, 8 * MiB, "the memory limit of 100 MiB")),  # never below FREE_WINDOW
    ],
)
def test_plan_memory(
    workers: int, max_window: int, limit: int | None, expected: tuple[int, int, str]
) -> None:
    plan = plan_memory(workers, max_window, limit)
    assert (plan.workers, plan.max_window, plan.limited_by) == expected


def test_memory_limit_from_cgroup_files(tmp_path: Path) -> None:
    """v2 (one unified hierarchy) and v1 (a memory controller), nested."""
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "sys"
    (v2 / "system.slice/x.service").mkdir(parents=True)
    (v2 / "system.slice/memory.max").write_text("max\n")
    (v2 / "system.slice/x.service/memory.max").write_text(f"{512 * MiB}\n")
    proc.write_text("0::/system.slice/x.service\n")
    assert memory_limit(str(proc), str(v2)) == 512 * MiB
    (v2 / "memory/a/b").mkdir(parents=True)
    (v2 / "memory/a/memory.limit_in_bytes").write_text(f"{300 * MiB}\n")
    (v2 / "memory/a/b/memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc.write_text("4:memory:/a/b\n1:cpu:/\n")
    assert memory_limit(str(proc), str(v2)) == 300 * MiB
    proc.write_text("1:cpu:/\n")
    assert memory_limit(str(proc), str(v2)) is None
