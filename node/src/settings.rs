//! `sund`'s settings file: defaults a person sets once instead of typing them with every
//! command. Apart from the device's own `node.toml` (which holds its gateway, user and
//! enrolment secret, and is written by `sund init`), this file is the person's to edit.
//!
//! ```toml
//! # $SUND_CONFIG, else $XDG_CONFIG_HOME/sund/config.toml, else ~/.config/sund/config.toml
//! data_dir = "~/.local/share/sund"   # where the device lives, instead of --data-dir
//! log = "info"                       # what goes to stderr, instead of RUST_LOG
//! fetch_into = "~/Downloads"         # `sund follow` saves offered files here
//! ```
//!
//! A flag wins over the environment (`SUND_DATA_DIR`, `RUST_LOG`), which wins over this file,
//! which wins over the built-in default. Paths are absolute or start with `~/`. A file with an
//! unknown key or a bad value is refused with its path and what to fix, never half-read.
//! `SUND_CONFIG=""` reads no file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The settings file's contents.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The device's data directory, when neither `--data-dir` nor `SUND_DATA_DIR` names one.
    pub data_dir: Option<PathBuf>,
    /// The log filter (as `RUST_LOG`), when `RUST_LOG` is not set.
    pub log: Option<String>,
    /// Where `sund follow` saves offered files when `--fetch-into` is not given.
    pub fetch_into: Option<PathBuf>,
}

/// Where the settings file is looked for, and whether it was named explicitly
/// (`SUND_CONFIG`), so that a missing one is an error; `None` when `SUND_CONFIG` is empty or
/// no home is known.
pub fn location() -> Option<(PathBuf, bool)> {
    if let Some(named) = std::env::var_os("SUND_CONFIG") {
        return (!named.is_empty()).then(|| (PathBuf::from(named), true));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".config")))?;
    Some((base.join("sund").join("config.toml"), false))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Reads the settings file, if there is one: its path and contents.
pub fn load() -> Result<Option<(PathBuf, Settings)>, String> {
    let Some((path, named)) = location() else {
        return Ok(None);
    };
    let text =
        match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => return Ok(None),
            Err(e) => {
                return Err(format!(
                "cannot read the settings file {}{}: {e}; {}, or set SUND_CONFIG=\"\" to read none",
                path.display(),
                if named { " (named by SUND_CONFIG)" } else { "" },
                if named { "fix the name" } else { "fix its permissions" },
            ))
            }
        };
    let settings = parse(&text, &path)?;
    Ok(Some((path, settings)))
}

/// Parses a settings file's text (`path` names it in errors), expanding `~/`.
pub fn parse(text: &str, path: &Path) -> Result<Settings, String> {
    let fix = |what: String| {
        format!(
            "settings file {}: {what}; fix it, or set SUND_CONFIG=\"\" to read none",
            path.display()
        )
    };
    let mut settings: Settings = toml::from_str(text).map_err(|e| fix(e.message().to_string()))?;
    for (key, value) in [
        ("data_dir", &mut settings.data_dir),
        ("fetch_into", &mut settings.fetch_into),
    ] {
        if let Some(dir) = value.take() {
            *value = Some(expand(&dir).ok_or_else(|| {
                fix(format!(
                    "{key} = {:?} is not an absolute path or one starting with ~/",
                    dir.display().to_string()
                ))
            })?);
        }
    }
    if let Some(filter) = &settings.log {
        tracing_subscriber::EnvFilter::try_new(filter)
            .map_err(|e| fix(format!("log = {filter:?} is not a log filter ({e}), such as \"info\" or \"warn,sund_node=debug\"")))?;
    }
    Ok(settings)
}

/// `~/x` under the home directory; an absolute path as it is; else `None`.
fn expand(path: &Path) -> Option<PathBuf> {
    if let Ok(rest) = path.strip_prefix("~") {
        return home().map(|h| h.join(rest));
    }
    path.is_absolute().then(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Settings, String> {
        parse(text, Path::new("/home/a/.config/sund/config.toml"))
    }

    #[test]
    fn every_key_is_read_and_paths_expand() {
        let settings = parsed(
            "data_dir = \"/srv/sund/alice\"\nlog = \"info,sund_node=debug\"\nfetch_into = \"/tmp/in\"\n",
        )
        .unwrap();
        assert_eq!(
            settings.data_dir.as_deref(),
            Some(Path::new("/srv/sund/alice"))
        );
        assert_eq!(settings.log.as_deref(), Some("info,sund_node=debug"));
        assert_eq!(settings.fetch_into.as_deref(), Some(Path::new("/tmp/in")));
        assert_eq!(parsed("").unwrap(), Settings::default());
    }

    #[test]
    fn mistakes_are_refused_with_the_file_and_the_key() {
        let unknown = parsed("dat_dir = \"/x\"").unwrap_err();
        assert!(
            unknown.contains("config.toml") && unknown.contains("dat_dir"),
            "{unknown}"
        );
        let relative = parsed("data_dir = \"alice\"").unwrap_err();
        assert!(relative.contains("not an absolute path"), "{relative}");
        let filter = parsed("log = \"info,=[\"").unwrap_err();
        assert!(filter.contains("not a log filter"), "{filter}");
        let kind = parsed("data_dir = 3").unwrap_err();
        assert!(kind.contains("config.toml"), "{kind}");
    }
}
