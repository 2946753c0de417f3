//! The site's app registry: which component version each app runs, persisted in redb.
//!
//! Layout (format version 1), in `<data>/registry.redb`:
//! - `meta`: `"format"` → the format version (u64).
//! - `apps`: app name → JSON [`AppRecord`] (explicit fields, versioned by `meta.format`).
//! - `components`: version (SHA-256 hex) → component bytes, shared by apps with the same bytes.
//! - `signed`: app name → the newest `signed_at_ms` of a deploy or delete this site ran (kept
//!   after a delete, never replicated nor discarded by a resync: an older signed record is never
//!   run again; added without a format change, an older registry simply has none).
//!
//! Every change is one redb transaction committed with immediate durability: an upload the
//! client saw succeed survives a crash of the site.

use std::path::Path;

use anyhow::{Context, Result, bail};
use atoll_deploy::Vars;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const COMPONENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("components");
const SIGNED: TableDefinition<&str, u64> = TableDefinition::new("signed");

/// The registry format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// What the registry keeps about one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRecord {
    /// SHA-256 hex of the component.
    pub version: String,
    /// Size of the component in bytes.
    pub size: u64,
    /// When this version was uploaded, in milliseconds since the Unix epoch.
    pub uploaded_at_ms: u64,
    /// The app's settings at upload.
    pub settings: StoredSettings,
}

/// [`atoll_runtime::AppSettings`] as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSettings {
    pub deadline_ms: u64,
    pub max_memory_bytes: u64,
    pub max_request_body: u64,
    pub max_response_body: u64,
    pub allowed_hosts: Vec<String>,
    /// Absent in records from before Spin key-value support (and when empty, so that older
    /// sites read the record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv_stores: Vec<String>,
    /// The app's variables: absent when there are none (so that older sites read the record).
    #[serde(default, skip_serializing_if = "Vars::is_empty")]
    pub variables: Vars,
    /// The app's session choices: absent when default (so that older sites read the record).
    #[serde(default, skip_serializing_if = "crate::signing::SessionPolicy::is_default")]
    pub session: crate::signing::SessionPolicy,
}

impl From<&atoll_runtime::AppSettings> for StoredSettings {
    fn from(s: &atoll_runtime::AppSettings) -> Self {
        StoredSettings {
            deadline_ms: s.limits.deadline.as_millis() as u64,
            max_memory_bytes: s.limits.max_memory_bytes as u64,
            max_request_body: s.limits.max_request_body as u64,
            max_response_body: s.limits.max_response_body as u64,
            allowed_hosts: s.allowed_hosts.clone(),
            kv_stores: s.kv_stores.clone(),
            variables: Vars(s.variables.values().clone()),
            // Not a runtime setting: set from the deploy's parameters by the caller.
            session: Default::default(),
        }
    }
}

impl From<&StoredSettings> for atoll_runtime::AppSettings {
    fn from(s: &StoredSettings) -> Self {
        atoll_runtime::AppSettings {
            limits: atoll_runtime::Limits {
                deadline: std::time::Duration::from_millis(s.deadline_ms),
                max_memory_bytes: s.max_memory_bytes as usize,
                max_request_body: s.max_request_body as usize,
                max_response_body: s.max_response_body as usize,
            },
            allowed_hosts: s.allowed_hosts.clone(),
            kv_stores: s.kv_stores.clone(),
            // Checked at deploy; a record edited on disk since loses its variables, said here.
            variables: atoll_runtime::Variables::new(s.variables.0.clone()).unwrap_or_else(|e| {
                tracing::warn!(
                    "the registry holds an invalid variable, so the app runs without variables: {e}"
                );
                atoll_runtime::Variables::default()
            }),
        }
    }
}

/// The registry database.
#[derive(Debug)]
pub struct Registry {
    db: Database,
}

impl Registry {
    /// Opens (or creates) the registry in `dir`, checking its format version.
    pub fn open(dir: &Path) -> Result<Registry> {
        let path = dir.join("registry.redb");
        let db = Database::create(&path)
            .with_context(|| format!("cannot open the registry {}", path.display()))?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("format")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("format", FORMAT_VERSION)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(other) => bail!(
                    "the registry {} has format version {other}, but this atoll reads version {FORMAT_VERSION}; \
                     use a matching atoll release",
                    path.display()
                ),
            }
            txn.open_table(APPS)?;
            txn.open_table(COMPONENTS)?;
            txn.open_table(SIGNED)?;
        }
        txn.commit()?;
        Ok(Registry { db })
    }

    /// Records `record` as the current version of `name`, storing `wasm` if it is new.
    pub fn put(&self, name: &str, record: &AppRecord, wasm: &[u8]) -> Result<()> {
        let encoded = serde_json::to_vec(record)?;
        let txn = self.db.begin_write()?;
        {
            let mut components = txn.open_table(COMPONENTS)?;
            if components.get(record.version.as_str())?.is_none() {
                components.insert(record.version.as_str(), wasm)?;
            }
            let mut apps = txn.open_table(APPS)?;
            let previous = apps.insert(name, encoded.as_slice())?.map(|v| decode(v.value())).transpose()?;
            if let Some(previous) = previous {
                drop_unreferenced(&apps, &mut components, &previous.version)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores a component by its version (from a backup), if its bytes hash to that version;
    /// an app whose replicated deploy record names it then runs without fetching it.
    pub fn put_component(&self, version: &str, wasm: &[u8]) -> Result<()> {
        use sha2::Digest;
        let hash: String = sha2::Sha256::digest(wasm).iter().map(|b| format!("{b:02x}")).collect();
        if hash != version {
            bail!("a component said to be version {version} hashes to {hash}");
        }
        let txn = self.db.begin_write()?;
        txn.open_table(COMPONENTS)?.insert(version, wasm)?;
        txn.commit()?;
        Ok(())
    }

    /// Removes `name`; returns whether it existed.
    pub fn delete(&self, name: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut apps = txn.open_table(APPS)?;
            let removed = apps.remove(name)?.map(|v| decode(v.value())).transpose()?;
            if let Some(removed) = &removed {
                let mut components = txn.open_table(COMPONENTS)?;
                drop_unreferenced(&apps, &mut components, &removed.version)?;
            }
            removed.is_some()
        };
        txn.commit()?;
        Ok(existed)
    }

    /// The newest signing time of a deploy or delete of `name` this site ran (0: none).
    pub fn signed_at(&self, name: &str) -> Result<u64> {
        let txn = self.db.begin_read()?;
        let signed = txn.open_table(SIGNED)?;
        Ok(signed.get(name)?.map_or(0, |v| v.value()))
    }

    /// Raises the newest signing time of `name` to `at` (durably).
    pub fn raise_signed_at(&self, name: &str, at: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut signed = txn.open_table(SIGNED)?;
            let current = signed.get(name)?.map_or(0, |v| v.value());
            if at > current {
                signed.insert(name, at)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The component with this version, if stored.
    pub fn component(&self, version: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let components = txn.open_table(COMPONENTS)?;
        Ok(components.get(version)?.map(|v| v.value().to_vec()))
    }

    /// The versions of the components the apps run (each once).
    pub fn versions(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let apps = txn.open_table(APPS)?;
        let mut versions = std::collections::BTreeSet::new();
        for entry in apps.iter()? {
            versions.insert(decode(entry?.1.value())?.version);
        }
        Ok(versions.into_iter().collect())
    }

    /// Every app with its record and component bytes.
    pub fn load_all(&self) -> Result<Vec<(String, AppRecord, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let apps = txn.open_table(APPS)?;
        let components = txn.open_table(COMPONENTS)?;
        let mut all = Vec::new();
        for entry in apps.iter()? {
            let (name, value) = entry?;
            let record = decode(value.value())?;
            let wasm = components
                .get(record.version.as_str())?
                .with_context(|| format!("registry is missing the component of app {}", name.value()))?
                .value()
                .to_vec();
            all.push((name.value().to_owned(), record, wasm));
        }
        Ok(all)
    }
}

fn decode(bytes: &[u8]) -> Result<AppRecord> {
    serde_json::from_slice(bytes).context("corrupt app record in the registry")
}

/// Removes the component `version` unless some app still runs it.
fn drop_unreferenced(
    apps: &redb::Table<&str, &[u8]>,
    components: &mut redb::Table<&str, &[u8]>,
    version: &str,
) -> Result<()> {
    for entry in apps.iter()? {
        if decode(entry?.1.value())?.version == version {
            return Ok(());
        }
    }
    components.remove(version)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: &str) -> AppRecord {
        AppRecord {
            version: version.into(),
            size: 3,
            uploaded_at_ms: 1,
            settings: (&atoll_runtime::AppSettings::default()).into(),
        }
    }

    #[test]
    fn survives_reopen_and_shares_components() -> Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let reg = Registry::open(dir.path())?;
            reg.put("a", &record("v1"), b"one")?;
            reg.put("b", &record("v1"), b"one")?;
            reg.put("a", &record("v2"), b"two")?;
        }
        let reg = Registry::open(dir.path())?;
        let all = reg.load_all()?;
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].0.as_str(), all[0].2.as_slice()), ("a", b"two".as_slice()));
        assert_eq!((all[1].0.as_str(), all[1].2.as_slice()), ("b", b"one".as_slice()));
        assert!(reg.delete("b")?);
        assert!(!reg.delete("b")?);
        // v1 is no longer referenced and is gone; v2 stays.
        let txn = reg.db.begin_read()?;
        let components = txn.open_table(COMPONENTS)?;
        assert!(components.get("v1")?.is_none());
        assert!(components.get("v2")?.is_some());
        Ok(())
    }

    #[test]
    fn unknown_format_version_is_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        drop(Registry::open(dir.path())?);
        {
            let db = Database::create(dir.path().join("registry.redb"))?;
            let txn = db.begin_write()?;
            txn.open_table(META)?.insert("format", 99)?;
            txn.commit()?;
        }
        let err = Registry::open(dir.path()).expect_err("must refuse");
        assert!(err.to_string().contains("format version 99"), "{err}");
        Ok(())
    }
}
