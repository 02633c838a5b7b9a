-- Schema version 2: what status asks of the keys, kept with them, so that it
-- costs the hosts and the rows since the last pass, not every row.

-- Per host: its keys (episodes with a row) and the rows beyond the first
-- of each (duplicates), kept by the triggers below (and by a rebuild, which
-- replaces the keys table: state/keys.py, Keys.replace).
ALTER TABLE hosts ADD COLUMN keys INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0;

-- A host's keys by the unix hour (and day) their first row was received
-- (received_at_wall; a time before 1970 counts as 0; keys without one are in
-- neither), so "received before the cutoff" is at most a day's hours and a
-- day a row per host: retention.cutoff is a whole hour.
CREATE TABLE received_hours (
    host INTEGER NOT NULL,
    hour INTEGER NOT NULL,
    keys INTEGER NOT NULL,
    PRIMARY KEY (host, hour)
) WITHOUT ROWID;
CREATE TABLE received_days (
    host INTEGER NOT NULL,
    day INTEGER NOT NULL,
    keys INTEGER NOT NULL,
    PRIMARY KEY (host, day)
) WITHOUT ROWID;

CREATE TRIGGER key_added AFTER INSERT ON keys BEGIN
    UPDATE hosts SET keys = keys + 1 WHERE id = new.host;
    INSERT INTO received_hours SELECT new.host, max(new.received, 0) / 3600, 1 WHERE new.received IS NOT NULL
        ON CONFLICT (host, hour) DO UPDATE SET keys = keys + 1;
    INSERT INTO received_days SELECT new.host, max(new.received, 0) / 86400, 1 WHERE new.received IS NOT NULL
        ON CONFLICT (host, day) DO UPDATE SET keys = keys + 1;
END;

CREATE TRIGGER key_repeated AFTER UPDATE OF copies ON keys BEGIN
    UPDATE hosts SET duplicates = duplicates + new.copies - old.copies WHERE id = new.host;
END;

-- The counts of the keys a file of version 1 holds.
UPDATE hosts SET
    keys = (SELECT count(*) FROM keys WHERE keys.host = hosts.id),
    duplicates = (SELECT total(copies) - count(*) FROM keys WHERE keys.host = hosts.id);
INSERT INTO received_hours
    SELECT host, max(received, 0) / 3600, count(*) FROM keys WHERE received IS NOT NULL GROUP BY 1, 2;
INSERT INTO received_days SELECT host, hour / 24, total(keys) FROM received_hours GROUP BY 1, 2;
