//! Durable state: SQLite (WAL, `synchronous=FULL`), one table per kind of object.
//!
//! The server keeps its working state in memory and writes every change through to
//! the store before acknowledging it, so reads never touch the disk and nothing that
//! was acknowledged is lost, `kill -9` included. At start the state is loaded back.
//! Schema changes are numbered SQL files in `host/migrations`, applied in order
//! inside a transaction and recorded in `PRAGMA user_version`.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Migrations, in order; the position is the schema version they lead to.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_objects.sql"),
    include_str!("../migrations/0002_auth.sql"),
    include_str!("../migrations/0003_event_queue.sql"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Clusters,
    Nodes,
    Workloads,
    FilePackages,
    Algorithms,
    MachinePackages,
    Services,
    Tasks,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Clusters => "clusters",
            Table::Nodes => "nodes",
            Table::Workloads => "workloads",
            Table::FilePackages => "file_packages",
            Table::Algorithms => "algorithms",
            Table::MachinePackages => "machine_packages",
            Table::Services => "services",
            Table::Tasks => "tasks",
        }
    }
}

/// One change in a [`Store::apply`] batch.
pub enum Change<'a> {
    Put {
        table: Table,
        key: &'a str,
        body: String,
    },
    Delete {
        table: Table,
        key: &'a str,
    },
}

impl<'a> Change<'a> {
    pub fn put<T: Serialize>(table: Table, key: &'a str, value: &T) -> anyhow::Result<Change<'a>> {
        Ok(Change::Put {
            table,
            key,
            body: serde_json::to_string(value)?,
        })
    }

    pub fn delete(table: Table, key: &'a str) -> Change<'a> {
        Change::Delete { table, key }
    }
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let mut conn =
            Connection::open(path).with_context(|| format!("open database {}", path.display()))?;
        // It holds client secrets' hashes and token signing keys: its owner's only
        // (SQLite gives its journal files the same permissions).
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .with_context(|| format!("restrict {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn).with_context(|| format!("migrate {}", path.display()))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        crate::sync::lock(&self.conn)
    }

    /// Runs `f` on the connection, for modules with tables of their own shape
    /// (the auth tables); `f` opens its own transaction where it needs one.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> anyhow::Result<T> {
        Ok(f(&mut self.conn())?)
    }

    /// Applies changes atomically: all of them are durable when this returns Ok, or
    /// none is.
    pub fn apply(&self, changes: &[Change<'_>]) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = crate::dates::now_ms() as i64;
        for change in changes {
            match change {
                Change::Put { table, key, body } => {
                    tx.execute(
                        &format!(
                            "INSERT INTO {} (key, body, created_ms) VALUES (?1, ?2, ?3)
                             ON CONFLICT(key) DO UPDATE SET body = excluded.body",
                            table.name()
                        ),
                        params![key, body, now],
                    )?;
                }
                Change::Delete { table, key } => {
                    tx.execute(
                        &format!("DELETE FROM {} WHERE key = ?1", table.name()),
                        params![key],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> anyhow::Result<()> {
        self.apply(&[Change::put(table, key, value)?])
    }

    pub fn delete(&self, table: Table, key: &str) -> anyhow::Result<()> {
        self.apply(&[Change::delete(table, key)])
    }

    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> anyhow::Result<Option<T>> {
        let body: Option<String> = self
            .conn()
            .query_row(
                &format!("SELECT body FROM {} WHERE key = ?1", table.name()),
                params![key],
                |row| row.get(0),
            )
            .optional()?;
        body.map(|b| serde_json::from_str(&b).context("stored row"))
            .transpose()
    }

    /// Every row of `table`, in insertion order. A row that no longer parses is
    /// skipped with an error in the log rather than stopping the server.
    pub fn load<T: DeserializeOwned>(&self, table: Table) -> anyhow::Result<Vec<(String, T)>> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT key, body FROM {} ORDER BY rowid",
            table.name()
        ))?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, body) = row?;
            // An acknowledged object must not vanish: a row that cannot be read stops
            // the start, naming itself, rather than being skipped.
            let value = serde_json::from_str(&body).map_err(|e| {
                anyhow::anyhow!(
                    "table {}, row {key:?} cannot be read ({e}); refusing to start without \
                     it: restore the database from a backup, or delete that row with sqlite3 \
                     if the object may go",
                    table.name()
                )
            })?;
            out.push((key, value));
        }
        Ok(out)
    }
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        anyhow::bail!(
            "database schema version {version} is newer than this xpud ({}): refusing to touch it",
            MIGRATIONS.len()
        );
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = index + 1, "database migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_persist_in_order_and_reopen_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xpud.db");
        {
            let store = Store::open(&path).unwrap();
            store.put(Table::Tasks, "b", &vec![2]).unwrap();
            store.put(Table::Tasks, "a", &vec![1]).unwrap();
            store.put(Table::Tasks, "b", &vec![3]).unwrap();
            store
                .apply(&[
                    Change::put(Table::Clusters, "c", &"x").unwrap(),
                    Change::delete(Table::Tasks, "a"),
                ])
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let tasks: Vec<(String, Vec<i32>)> = store.load(Table::Tasks).unwrap();
        assert_eq!(tasks, vec![("b".to_string(), vec![3])]);
        assert_eq!(
            store
                .get::<String>(Table::Clusters, "c")
                .unwrap()
                .as_deref(),
            Some("x")
        );
        assert_eq!(store.get::<String>(Table::Clusters, "zz").unwrap(), None);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xpud.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(format!("{err:#}").contains("migrate"), "{err}");
    }
}
