"""A stand-in for the receiver's locking: `python lockholder.py PATH MODE`
takes an exclusive lock of one family (flock, lockf or ofd) on PATH, prints
"locked", and holds it until its stdin closes."""

import fcntl
import os
import struct
import sys

path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
if mode == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
elif mode == "lockf":
    fcntl.lockf(fd, fcntl.LOCK_EX)
elif mode == "ofd":
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
else:
    raise SystemExit(f"unknown mode {mode}")
print("locked", flush=True)
sys.stdin.read()
