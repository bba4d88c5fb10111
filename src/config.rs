//! Settings of `chartlog serve` and `chartlog token`: command-line flags, then `CHARTLOG_*`
//! environment variables, then a TOML config file, then defaults, in that order of precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::auth::IssuerConfig;
use crate::log::KafkaConfig;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./chartlog-data";
/// Default listen address: loopback only, so a first start exposes nothing to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Contents of a config file. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data: Option<PathBuf>,
    /// Listen address.
    pub listen: Option<String>,
    /// Key-encryption key file.
    pub key_file: Option<PathBuf>,
    /// Base URL clients use, for fullUrl and Location headers.
    pub base_url: Option<String>,
    /// Trusted token issuers.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Whether the development issuer of `chartlog token` is trusted. Defaults to true when no
    /// issuer is configured and false otherwise.
    pub dev_issuer: Option<bool>,
    /// Log backend: `embedded` (the default) or `kafka`.
    pub log_backend: Option<String>,
    /// Kafka settings, used with `log_backend = "kafka"`.
    pub kafka: Option<KafkaConfig>,
}

impl FileConfig {
    /// Reads a config file.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be read or is not valid TOML for these settings.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|error: toml::de::Error| {
            // toml's own text quotes the offending line over several lines; one line is the
            // rule for command-line errors.
            let line = error
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            let place = line.map_or_else(String::new, |line| format!(" at line {line}"));
            anyhow::anyhow!(
                "invalid config file {}{place}: {}",
                path.display(),
                error
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|part| !part.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })
    }
}

/// Settings of a server, after merging every source.
#[derive(Debug)]
pub struct ServeSettings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Key-encryption key file, when not the default.
    pub key_file: Option<PathBuf>,
    /// Base URL of the FHIR endpoint.
    pub base_url: String,
    /// Trusted issuers.
    pub issuers: Vec<IssuerConfig>,
    /// Whether the development issuer is trusted.
    pub dev_issuer: bool,
    /// The Kafka log, when the backend is Kafka.
    pub kafka: Option<KafkaConfig>,
}

/// Values given on the command line or in the environment (clap merges those two).
#[derive(Debug, Default)]
pub struct Overrides {
    /// `--data` / `CHARTLOG_DATA`.
    pub data: Option<PathBuf>,
    /// `--listen` / `CHARTLOG_LISTEN`.
    pub listen: Option<String>,
    /// `--key-file` / `CHARTLOG_KEY_FILE`.
    pub key_file: Option<PathBuf>,
    /// `--base-url` / `CHARTLOG_BASE_URL`.
    pub base_url: Option<String>,
    /// `--config` / `CHARTLOG_CONFIG`.
    pub config: Option<PathBuf>,
    /// `--log-backend` / `CHARTLOG_LOG_BACKEND`.
    pub log_backend: Option<String>,
}

impl ServeSettings {
    /// Merges flags and environment over the config file and defaults.
    ///
    /// # Errors
    ///
    /// Fails on an unreadable config file or an invalid listen address.
    pub fn resolve(overrides: Overrides) -> anyhow::Result<ServeSettings> {
        let file = match &overrides.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let data_dir = overrides
            .data
            .or(file.data)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let listen_text = overrides
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().with_context(|| {
            format!(
                "invalid listen address {listen_text}; expected HOST:PORT such as 127.0.0.1:8080"
            )
        })?;
        let base_url = overrides
            .base_url
            .or(file.base_url)
            .unwrap_or_else(|| format!("http://{listen}/fhir"))
            .trim_end_matches('/')
            .to_owned();
        let dev_issuer = file.dev_issuer.unwrap_or(file.issuers.is_empty());
        let backend = overrides
            .log_backend
            .or(file.log_backend)
            .unwrap_or_else(|| "embedded".to_owned());
        let kafka = match backend.as_str() {
            "embedded" => None,
            "kafka" => Some(KafkaConfig::from_env(file.kafka)?.context(
                "the kafka log backend needs CHARTLOG_KAFKA_BOOTSTRAP_SERVERS or [kafka] bootstrap_servers in the config file",
            )?),
            other => anyhow::bail!("unknown log backend {other}; expected embedded or kafka"),
        };
        Ok(ServeSettings {
            data_dir,
            listen,
            key_file: overrides.key_file.or(file.key_file),
            base_url,
            issuers: file.issuers,
            dev_issuer,
            kafka,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chartlog.toml");
        std::fs::write(
            &path,
            "data = \"/from/file\"\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let settings = ServeSettings::resolve(Overrides {
            data: Some("/from/flag".into()),
            config: Some(path),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(settings.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(settings.listen.port(), 9000);
        assert_eq!(settings.base_url, "http://127.0.0.1:9000/fhir");
        assert!(
            settings.dev_issuer,
            "with no issuers the development issuer is trusted"
        );
    }

    #[test]
    fn unknown_config_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chartlog.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let error = ServeSettings::resolve(Overrides {
            config: Some(path),
            ..Overrides::default()
        })
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("invalid config file"),
            "{error:#}"
        );
    }

    #[test]
    fn unknown_log_backend_is_rejected() {
        let error = ServeSettings::resolve(Overrides {
            log_backend: Some("tape".into()),
            ..Overrides::default()
        })
        .unwrap_err();
        assert!(
            error.to_string().contains("unknown log backend tape"),
            "{error}"
        );
    }

    #[test]
    fn kafka_backend_reads_its_file_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chartlog.toml");
        let text = "log_backend = \"kafka\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:19092\"\ntopic = \"charts\"\n[kafka.properties]\n\"security.protocol\" = \"SSL\"\n";
        std::fs::write(&path, text).unwrap();
        let settings = ServeSettings::resolve(Overrides {
            config: Some(path),
            ..Overrides::default()
        })
        .unwrap();
        let kafka = settings.kafka.expect("the kafka backend was chosen");
        assert_eq!(kafka.topic, "charts");
        assert_eq!(
            kafka
                .properties
                .get("security.protocol")
                .map(String::as_str),
            Some("SSL")
        );
    }

    #[test]
    fn invalid_listen_address_is_rejected() {
        let error = ServeSettings::resolve(Overrides {
            listen: Some("nowhere".into()),
            ..Overrides::default()
        })
        .unwrap_err();
        assert!(
            error.to_string().contains("invalid listen address"),
            "{error}"
        );
    }
}
