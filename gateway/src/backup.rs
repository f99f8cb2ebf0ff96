//! `sund-gateway admin backup FILE` and `admin restore FILE`: a gateway's whole state in one
//! file, taken while it serves (a redb snapshot: commits go on meanwhile) or from a stopped
//! gateway's database, and a new data directory made from it.
//!
//! The backup holds every table, the file chunks inline (they live in `values/` beside the
//! database), and the gateway's TLS identity (table [`BACKUP_TLS_TABLE`]), since devices pin
//! its certificate: a gateway restored with another identity would be refused by all of them.
//! It is a secret like the data directory itself (the trust root's key and the TLS key are in
//! it): mode 0600.

use std::io::Write;
use std::path::Path;

use sund_model::env::{Store, StoreRead, Table, WriteBatch};
use sund_model::trust::RegistrationAuthority;
use sund_runtime::store::{RedbReader, RedbStore};

use crate::admin::Printed;

/// The table of a backup holding the gateway's TLS identity (`cert.der`, `key.der`); removed
/// from the database once restored.
pub const BACKUP_TLS_TABLE: Table = Table("backup_tls");
const TLS_FILES: [&str; 2] = ["cert.der", "key.der"];

/// Backs up the gateway whose data directory is `data_dir` and whose database `reader` reads,
/// into the new file `dest`.
pub fn backup(reader: &RedbReader, data_dir: &Path, dest: &Path) -> Result<Printed, String> {
    let mut extra = Vec::new();
    for name in TLS_FILES {
        let path = data_dir.join("tls").join(name);
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "cannot read the gateway's TLS identity {}: {e}; it belongs in the backup (devices pin it)",
                path.display()
            )
        })?;
        extra.push((BACKUP_TLS_TABLE, name.as_bytes().to_vec(), bytes));
    }
    let summary = reader
        .backup_to(dest, &extra)
        .map_err(|e| format!("the backup failed: {e}"))?;
    let mut stderr = String::new();
    if summary.values_gone > 0 {
        stderr = format!(
            "{} file chunk(s) were dropped while the backup ran and are not in it (their transfers had ended)\n",
            summary.values_gone
        );
    }
    Ok(Printed {
        stdout: format!(
            "backed up {} records of {} tables ({:.1} MiB) to {}\n",
            summary.records,
            summary.tables,
            summary.bytes as f64 / (1 << 20) as f64,
            dest.display()
        ),
        stderr,
    })
}

/// Makes `data_dir` (which must hold no database) a copy of the gateway backed up in `file`.
pub fn restore(file: &Path, data_dir: &Path) -> Result<Printed, String> {
    let path = data_dir.join("gateway.redb");
    if path.exists() {
        return Err(format!(
            "{} holds a gateway database already: restore into a new data directory (another --data-dir), then run the gateway there",
            data_dir.display()
        ));
    }
    // Nothing of another gateway (a TLS identity made by `cert`, say) is overwritten.
    if std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(format!(
            "{} is not empty: restore into a new or empty directory, so that nothing in it is overwritten",
            data_dir.display()
        ));
    }
    if !file.is_file() {
        return Err(format!(
            "{} is not a file: give the path of a backup `sund-gateway admin backup` wrote",
            file.display()
        ));
    }
    let not_backup = |why: String| {
        format!(
            "{} is not a gateway backup ({why}): give a file `sund-gateway admin backup` wrote",
            file.display()
        )
    };
    // Checked whole (every page against its checksum) before anything is written.
    let (tls, root) = {
        let backup = RedbStore::open(file).map_err(|e| not_backup(e.to_string()))?;
        let authority = RegistrationAuthority::recover(&backup)
            .map_err(|e| not_backup(e.to_string()))?
            .ok_or_else(|| not_backup("it holds no trust root".into()))?;
        let mut tls = Vec::new();
        for name in TLS_FILES {
            let bytes = backup
                .get(BACKUP_TLS_TABLE, name.as_bytes())
                .map_err(|e| not_backup(e.to_string()))?
                .ok_or_else(|| not_backup(format!("its TLS identity lacks {name}")))?;
            tls.push((name, bytes));
        }
        (tls, authority.root().clone())
    };
    sund_runtime::files::private_dir(data_dir).map_err(|e| e.to_string())?;
    let tls_dir =
        sund_runtime::files::private_dir(&data_dir.join("tls")).map_err(|e| e.to_string())?;
    for (name, bytes) in &tls {
        write_private(&tls_dir.join(name), bytes)?;
    }
    let part = data_dir.join("gateway.redb.part");
    let _ = std::fs::remove_file(&part);
    std::fs::copy(file, &part).map_err(|e| {
        format!(
            "cannot copy {} into {}: {e}",
            file.display(),
            part.display()
        )
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::File::open(&part)?.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
    }
    std::fs::rename(&part, &path).map_err(|e| format!("cannot name {}: {e}", path.display()))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", data_dir.display()))?;
    // The TLS key now lives in tls/ only.
    let mut store = crate::driver::open_store(&path, None).map_err(|e| e.to_string())?;
    let mut batch = WriteBatch::default();
    for name in TLS_FILES {
        batch.delete(BACKUP_TLS_TABLE, name.as_bytes().to_vec());
    }
    store.commit(batch).map_err(|e| e.to_string())?;
    Ok(Printed {
        stdout: format!(
            "restored {} from {}: trust root {} of {}\n",
            data_dir.display(),
            file.display(),
            root.fingerprint(),
            root.domain
        ),
        stderr: format!(
            "start it with `sund-gateway run --data-dir {}`; devices resend what they sent after the backup, and are told of messages the backup does not hold\n",
            data_dir.display()
        ),
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
