-- Schema version 3: what scrub has found pruned, so that a round costs the
-- rows whose tarballs are kept, not every row the index remembers.

-- Runs of whole index lines, bytes [start, end), holding `lines` lines, every
-- one a row received before the retention cutoff whose tarball was gone
-- (`rows` of them; the latest received at unix second `newest`), found by a
-- scrub of the index with this device and inode whose 4 KiB before `end` hash
-- to `tail_sha256`. A later round counts such a run as pruned without reading
-- it, while the file and those bytes are the same and `newest` is still older
-- than the cutoff: a row found pruned stays pruned (its tarball is gone, and
-- the cutoff only moves on).
CREATE TABLE scrub_pruned (
    start INTEGER PRIMARY KEY,
    "end" INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    newest INTEGER NOT NULL,
    index_dev INTEGER NOT NULL,
    index_ino INTEGER NOT NULL,
    tail_sha256 BLOB NOT NULL
);
