"""The legacy backfill tool's work, restated as a reference for `many`.

The legacy one-shot script (cis490-index-backfill) is not kept in this
repository. Its cost per store is stated here as what it did, not as its
code: read the whole index with read_text().splitlines() and json.loads,
walk episodes/<host>/*.tar.zst, and for each tarball whose episode_id no row
names: sha256 in Python with 1 MiB reads, `zstd -q -d --stdout` into memory,
tarfile over that buffer to find the first member ending in meta.json, then
append every row through a text-mode file opened "a". Pass --legacy PATH to
run.py to measure the real script instead, where you have it.

    python legacy_like.py --episodes-root DIR --index FILE
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import subprocess
import tarfile
from datetime import datetime, timezone
from pathlib import Path


def _commit(path: Path) -> str | None:
    try:
        data = subprocess.check_output(["zstd", "-q", "-d", "--stdout", str(path)], stderr=subprocess.DEVNULL)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.name.endswith("meta.json") and member.isfile():
                    handle = tar.extractfile(member)
                    commit = (
                        json.loads(handle.read()).get("code_version", {}).get("commit") if handle else None
                    )
                    return commit.lower() if isinstance(commit, str) and len(commit) == 40 else None
    except (subprocess.CalledProcessError, OSError, tarfile.TarError, ValueError, AttributeError):
        return None
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes-root", type=Path, required=True)
    p.add_argument("--index", type=Path, required=True)
    args = p.parse_args()
    seen = set()
    if args.index.exists():
        for line in args.index.read_text().splitlines():
            if line.strip():
                with contextlib.suppress(ValueError):
                    seen.add(json.loads(line).get("episode_id"))
    rows = []
    for host in sorted(args.episodes_root.iterdir()):
        for tar in sorted(host.glob("*.tar.zst")):
            episode_id = tar.name.removesuffix(".tar.zst")
            if episode_id in seen:
                continue
            digest = hashlib.sha256()
            with tar.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            row = {
                "received_at_wall": datetime.now(timezone.utc).isoformat(),
                "host_id": host.name,
                "episode_id": episode_id,
                "sha256": digest.hexdigest(),
                "size_bytes": tar.stat().st_size,
                "schema_version": 1,
                "backfilled": True,
            }
            commit = _commit(tar)
            if commit:
                row["commit"] = commit
            rows.append(row)
    with args.index.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
