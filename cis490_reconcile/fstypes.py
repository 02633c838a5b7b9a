"""The filesystems the index lock cannot be trusted on, by statfs(2) magic
number (syscalls.filesystem_type), and why. preflight.network_filesystems
turns them into the lines a pass refuses to run with, and status and scrub
warn with.

The numbers: linux/magic.h and statfs(2) for NFS, SMB, CIFS, SMB2, FUSE,
Ceph, 9p, AFS, OCFS2, Coda and NCP; the kernel's or the filesystem's own
source for GFS2 (gfs2_ondisk.h), OrangeFS, vboxsf, Lustre (LL_SUPER_MAGIC)
and BeeGFS (BEEGFS_MAGIC); coreutils' table of remote types (`stat -f`) for
GPFS, PanFS, ACFS, StorNext, IBRIX, vmhgfs and prl_fs. `stat -f -c %t DIR`
prints a mount's number. A type missing here counts as local: an unlisted
remote one runs as it did before this check, and no local one is refused.
"""

from __future__ import annotations

from typing import NamedTuple

# why our lock need not exclude the receiver's there, by kind
WHY = {
    "network": "locks there are kept by the server, or by this client alone, and flock may be emulated "
    "with record locks",
    "cluster": "locks there are kept by the cluster, or by each node alone, depending on mount options",
    "FUSE": "locks there are the FUSE daemon's, often kept in this kernel only, not on the files it serves",
}

# magic: (name, kind); glusterfs, sshfs, CephFS's and Lustre's FUSE clients, Quobyte, MooseFS, JuiceFS
# and bindfs are all FUSE
TYPES: dict[int, tuple[str, str]] = {
    0x6969: ("nfs", "network"),
    0x517B: ("smb", "network"),
    0xFF534D42: ("cifs", "network"),
    0xFE534D42: ("smb2", "network"),
    0x01021997: ("9p", "network"),
    0x5346414F: ("afs", "network"),
    0x6B414653: ("kafs", "network"),
    0x73757245: ("coda", "network"),
    0x564C: ("ncpfs", "network"),
    0x786F4256: ("vboxsf", "network"),
    0xBACBACBC: ("vmhgfs", "network"),
    0x7C7C6673: ("prl_fs", "network"),
    0x00C36400: ("ceph", "cluster"),
    0x0BD00BD0: ("lustre", "cluster"),
    0x47504653: ("gpfs", "cluster"),
    0x19830326: ("beegfs", "cluster"),
    0x20030528: ("orangefs", "cluster"),
    0xAAD7AAEA: ("panfs", "cluster"),
    0x01161970: ("gfs2", "cluster"),
    0x7461636F: ("ocfs2", "cluster"),
    0x61636673: ("acfs", "cluster"),
    0xBEEFDEAD: ("snfs", "cluster"),
    0x013111A8: ("ibrix", "cluster"),
    0x65735546: ("fuse", "FUSE"),
}


class Filesystem(NamedTuple):
    name: str
    kind: str  # network, cluster or FUSE
    why: str


def classify(magic: int) -> Filesystem | None:
    """The filesystem of this statfs magic if the lock cannot be trusted on
    it; None for a local one (or one not known)."""
    found = TYPES.get(magic)
    return None if found is None else Filesystem(found[0], found[1], WHY[found[1]])
