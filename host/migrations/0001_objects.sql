-- One table per kind of object the standard manages. Each row is one object as its
-- typed Rust record serialised to JSON (`body`); `key` is its identifier. Rows keep
-- their insertion order (rowid), which is the order lists are returned in.
CREATE TABLE clusters          (key TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE nodes             (key TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE workloads         (key TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE file_packages     (key TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE algorithms        (key TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE machine_packages  (key TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE services          (key TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE tasks             (key TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);
