//! Data directories and secret files, kept private to their owner as ssh keeps `~/.ssh`.
//!
//! A gateway's database holds its trust root's secret key; a device's holds its MLS state and
//! its directory its device key. Directories are created `0700` and secret files `0600`; an
//! existing directory or secret file that other users can read or write is refused with the
//! `chmod` that fixes it, rather than used.

use std::io;
use std::path::{Path, PathBuf};

/// A data directory or secret file that is not private, or that cannot be made so.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Other users may read or write it.
    #[error("{path} is accessible to other users (mode {mode:o}); it holds secret keys: run `chmod {want:o} {path}` and start again")]
    TooOpen {
        /// The directory or file.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// The mode it must have.
        want: u32,
    },
    /// It could not be created or inspected.
    #[error("{path}: {source}")]
    Io {
        /// The directory or file.
        path: String,
        /// What failed.
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `dir` (and its parents) owner-only if it is missing; refuses an existing one that
/// other users can access.
pub fn private_dir(dir: &Path) -> Result<PathBuf, FileError> {
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir).map_err(io_error(dir))?;
    }
    check_private(dir, 0o700)?;
    Ok(dir.to_path_buf())
}

/// Creates the empty file `path` owner-only if it is missing (so that what is written into it
/// later is never readable by others); refuses an existing one that other users can access.
pub fn private_file(path: &Path) -> Result<(), FileError> {
    if !path.exists() {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        match options.open(path) {
            Ok(_) => {}
            // Created by someone else meanwhile: checked below like any existing file.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error(path)(e)),
        }
    }
    check_private(path, 0o600)
}

/// Refuses `path` if group or others have any access to it.
pub fn check_private(path: &Path, want: u32) -> Result<(), FileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(io_error(path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(FileError::TooOpen {
                path: path.display().to_string(),
                mode,
                want,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (path, want);
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_directories_and_files_are_private_and_open_ones_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data/gateway");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("gateway.redb");
        private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        private_file(&file).unwrap();

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = private_file(&file).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = private_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("mode 755") && err.contains("chmod 700"),
            "{err}"
        );
    }
}
