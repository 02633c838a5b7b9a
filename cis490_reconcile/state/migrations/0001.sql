-- Schema version 1 of the state database, run by state.py (see its docstring).
-- Run statement by statement (sqlite3.complete_statement), in one transaction.

-- The store this file describes: opened for another, it is not used.
CREATE TABLE store (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    episodes_root TEXT NOT NULL,
    index_path TEXT NOT NULL
);

-- The keys cover the index up to byte `offset` (`lines` lines) of the file
-- with this device and inode, whose 4 KiB before `offset` hash to
-- `tail_sha256`. rebuilt_at: when keys were last read from the whole index.
CREATE TABLE checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    index_dev INTEGER NOT NULL,
    index_ino INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    bad_lines INTEGER NOT NULL,
    tail_sha256 BLOB NOT NULL,
    rebuilt_at REAL NOT NULL
);

-- Id 0 stands for rows without host_id (they cover their episode on every
-- host). dir_*_ns: the directory as last listed (unchanged means nothing was
-- added or removed). *_rows: rows without a tarball, as of the last full pass.
CREATE TABLE hosts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    dir_mtime_ns INTEGER,
    dir_ctime_ns INTEGER,
    missing_rows INTEGER,
    pruned_rows INTEGER
);
INSERT INTO hosts (id, name) VALUES (0, '');

-- One key per (host, episode_id) in the index. digest: 12 bytes of BLAKE2b of
-- the episode_id (collisions within one host: about 1e-17 for a million
-- rows). offset: where the key's first row starts (read the names there).
-- received: its received_at_wall in unix seconds. copies over 1: duplicates.
-- About 33 bytes a row on disk.
CREATE TABLE keys (
    host INTEGER NOT NULL,
    digest BLOB NOT NULL,
    offset INTEGER NOT NULL,
    received INTEGER,
    copies INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (host, digest)
) WITHOUT ROWID;

-- The first state.EXAMPLES lines that are not rows.
CREATE TABLE bad_lines (line INTEGER PRIMARY KEY, offset INTEGER NOT NULL, reason TEXT NOT NULL);

-- Episodes the last pass left to look at again.
CREATE TABLE unresolved (
    host INTEGER NOT NULL,
    episode_id TEXT NOT NULL,
    PRIMARY KEY (host, episode_id)
) WITHOUT ROWID;

-- Tarballs found unverifiable: not read again while the file (dev, ino,
-- size, times) and the decoding limits stay the same.
CREATE TABLE unverifiable (
    host INTEGER NOT NULL,
    episode_id TEXT NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    limits TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (host, episode_id)
) WITHOUT ROWID;

-- JSON documents: "last_pass", "last_scrub" and the scrub's "scrub_cursor".
CREATE TABLE records (name TEXT PRIMARY KEY, value TEXT NOT NULL);
