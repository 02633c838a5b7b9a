"""A stand-in for the receiver's locking: `python lockholder.py PATH FAMILY`
takes an exclusive lock of one family (flock, lockf or ofd) on PATH, prints
"locked", and holds it until its stdin closes (helpers.LockHolder runs it)."""

import sys

from receiver_sim import family_lock

with family_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
