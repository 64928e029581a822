//! The `api` section of the pipeline configuration: where the operations HTTP API listens and who
//! may call it.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use crate::config::{invalid, ConfigError};

/// ```yaml
/// api:
///   listen: 127.0.0.1:9464      # absent: no API server
///   tokens_file: /etc/payslip/api-tokens.yaml
///   read_requires_token: false  # true: GET endpoints need a `read` (or `operate`) token too
///   max_body_bytes: 65536
///   command_timeout_ms: 30000   # how long POST /features/* waits for the decision
///   backup_dir: /var/lib/payslip/backups   # default: <monitor.state_dir>.backups
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Bearer tokens, each with a name and a role (see [`super::auth`]). Without it every mutating
    /// endpoint answers 401.
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    #[serde(default)]
    pub read_requires_token: bool,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// Where `POST /backup/checkpoint` writes the running monitor's checkpoints (one directory
    /// each, named by time). Default: `<monitor.state_dir>.backups`.
    #[serde(default)]
    pub backup_dir: Option<PathBuf>,
}

fn default_max_body_bytes() -> usize { 65_536 }
fn default_command_timeout_ms() -> u64 { 30_000 }

impl Default for ApiConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all api fields have defaults")
    }
}

impl ApiConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.read_requires_token && self.tokens_file.is_none() {
            return Err(invalid("api.read_requires_token", "is true but api.tokens_file is not set: nobody could read; set api.tokens_file"));
        }
        if !(1_024..=16 << 20).contains(&self.max_body_bytes) {
            return Err(invalid("api.max_body_bytes", format!("is {}; use 1024 to 16777216", self.max_body_bytes)));
        }
        if !(1_000..=600_000).contains(&self.command_timeout_ms) {
            return Err(invalid("api.command_timeout_ms", format!("is {}; use 1000 to 600000", self.command_timeout_ms)));
        }
        Ok(())
    }
}
