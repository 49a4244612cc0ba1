//! `--config FILE`: serving options from a TOML file.
//!
//! Every serving flag has a key of the same name in snake_case
//! (`--max-connections 100` is `max_connections = 100`); a flag given on
//! the command line wins over the file. The file's settings are turned into
//! the command-line arguments they stand for, so the file and the flags are
//! parsed and validated by the same code. An unknown key is an error that
//! names it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "config file {path}: unknown key {key:?} (keys are the serving flags in snake_case: {known})"
    )]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
    #[error("config file {path}: key {key:?} must be {expected}")]
    BadValue {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
}

/// A serving option as the file may set it.
#[derive(Debug, Clone)]
pub struct Key {
    /// The key (the flag's name in snake_case).
    pub name: String,
    /// The flag (`--max-connections`).
    pub flag: String,
    /// Whether the flag takes a value (false: an on/off switch).
    pub takes_value: bool,
}

/// The command-line arguments the file at `path` stands for, leaving out
/// the keys `given` says were on the command line.
pub fn file_args(
    path: &Path,
    keys: &[Key],
    given: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text, keys, given)
}

fn parse(
    path: &Path,
    text: &str,
    keys: &[Key],
    given: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigFileError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigFileError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
    let mut out = Vec::new();
    for (name, value) in &table {
        let Some(key) = keys.iter().find(|k| k.name == *name) else {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_owned(),
                key: name.clone(),
                known: keys
                    .iter()
                    .map(|k| k.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if given(name) {
            continue;
        }
        let bad = |expected| ConfigFileError::BadValue {
            path: path.to_owned(),
            key: name.clone(),
            expected,
        };
        if key.takes_value {
            let v = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                _ => return Err(bad("a string or an integer")),
            };
            out.push(OsString::from(format!("{}={v}", key.flag)));
        } else {
            match value {
                toml::Value::Boolean(true) => out.push(OsString::from(&key.flag)),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("true or false")),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<Key> {
        vec![
            Key {
                name: "listen".into(),
                flag: "--listen".into(),
                takes_value: true,
            },
            Key {
                name: "max_connections".into(),
                flag: "--max-connections".into(),
                takes_value: true,
            },
            Key {
                name: "require_auth".into(),
                flag: "--require-auth".into(),
                takes_value: false,
            },
        ]
    }

    fn args(text: &str, given: &[&str]) -> Result<Vec<String>, ConfigFileError> {
        parse(Path::new("f.toml"), text, &keys(), |k| given.contains(&k)).map(|v| {
            v.into_iter()
                .map(|s| s.into_string().expect("utf-8"))
                .collect()
        })
    }

    #[test]
    fn keys_become_flags_and_given_flags_win() {
        let a = args(
            "listen = \"127.0.0.1:9\"\nmax_connections = 5\nrequire_auth = true\n",
            &["listen"],
        )
        .expect("valid");
        assert_eq!(a, vec!["--max-connections=5", "--require-auth"]);
        assert!(
            args("require_auth = false\n", &[])
                .expect("valid")
                .is_empty()
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = args("listen = \"x\"\nmax_conections = 5\n", &[]).unwrap_err();
        assert!(
            e.to_string().contains("unknown key \"max_conections\""),
            "{e}"
        );
        let e = args("require_auth = \"yes\"\n", &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("\"require_auth\" must be true or false"),
            "{e}"
        );
        let e = args("listen = [1]\n", &[]).unwrap_err();
        assert!(e.to_string().contains("\"listen\" must be a string"), "{e}");
        let e = args("listen = \n", &[]).unwrap_err();
        assert!(e.to_string().contains("not valid TOML"), "{e}");
    }
}
