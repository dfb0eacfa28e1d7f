//! API keys (from the `api-keys` systemd credential) and per-key rate limits.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::{GatewayError, StartError};

/// Where the keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `$CREDENTIALS_DIRECTORY/api-keys` (the unit's `LoadCredential=api-keys:FILE`).
    Credential,
    /// An explicit file (`--api-keys-file`, for tests and development).
    File(PathBuf),
}

impl KeySource {
    /// Resolves the file to read, or explains what is missing.
    pub fn path(&self, host_file: &Path) -> Result<PathBuf, StartError> {
        match self {
            KeySource::File(p) => Ok(p.clone()),
            KeySource::Credential => match std::env::var_os("CREDENTIALS_DIRECTORY") {
                Some(dir) => Ok(Path::new(&dir).join(citadel_config::Gateway::API_KEYS_CREDENTIAL)),
                None => Err(StartError::Config(format!(
                    "gateway.auth is on but the systemd credential `{cred}` is not available: \
                     $CREDENTIALS_DIRECTORY is not set. The unit must have \
                     `LoadCredential={cred}:{file}` and {file} must exist; outside systemd pass \
                     `--api-keys-file PATH`",
                    cred = citadel_config::Gateway::API_KEYS_CREDENTIAL,
                    file = host_file.display()
                ))),
            },
        }
    }
}

/// Reads API keys: one per line, `#` comments and blank lines ignored.
/// Errors never include file contents.
pub fn read_keys(path: &Path, host_file: &Path) -> Result<Vec<Vec<u8>>, StartError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StartError::Config(format!(
            "cannot read API keys from {} (credential `{}`, host file {}): {e}",
            path.display(),
            citadel_config::Gateway::API_KEYS_CREDENTIAL,
            host_file.display()
        ))
    })?;
    let keys: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if keys.is_empty() {
        return Err(StartError::Config(format!(
            "gateway.auth is on but {} (credential `{}`, host file {}) holds no API key; \
             write one key per line",
            path.display(),
            citadel_config::Gateway::API_KEYS_CREDENTIAL,
            host_file.display()
        )));
    }
    Ok(keys)
}

/// Constant-time equality: the time depends only on the lengths, never on
/// where the contents differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

pub struct Auth {
    keys: Vec<Vec<u8>>,
    per_minute: u32,
    limiter: Arc<DefaultKeyedRateLimiter<usize>>,
}

impl Auth {
    pub fn new(keys: Vec<Vec<u8>>, per_minute: u32) -> Auth {
        Auth {
            limiter: Arc::new(RateLimiter::keyed(quota(per_minute))),
            keys,
            per_minute,
        }
    }

    /// Keeps the old limiter's state when keys and limit are unchanged (reload).
    pub fn reloaded(old: Option<&Auth>, keys: Vec<Vec<u8>>, per_minute: u32) -> Auth {
        match old {
            Some(o) if o.keys == keys && o.per_minute == per_minute => Auth {
                limiter: o.limiter.clone(),
                keys,
                per_minute,
            },
            _ => Auth::new(keys, per_minute),
        }
    }

    /// Checks `Authorization: Bearer KEY` and the key's rate limit.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), GatewayError> {
        let token = authorization
            .and_then(|h| {
                h.strip_prefix(b"Bearer ")
                    .or_else(|| h.strip_prefix(b"bearer "))
            })
            .map(|t| t.trim_ascii())
            .ok_or(GatewayError::MissingKey)?;
        // Compare against every key (no early exit) so timing reveals nothing.
        let mut found = None;
        for (i, k) in self.keys.iter().enumerate() {
            if ct_eq(k, token) {
                found = Some(i);
            }
        }
        let idx = found.ok_or(GatewayError::BadKey)?;
        self.limiter.check_key(&idx).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            GatewayError::RateLimited {
                retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }
}

fn quota(per_minute: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn auth_and_limit() {
        let a = Auth::new(vec![b"k1".to_vec(), b"k2".to_vec()], 2);
        assert!(matches!(a.check(None), Err(GatewayError::MissingKey)));
        assert!(matches!(
            a.check(Some(b"Bearer nope")),
            Err(GatewayError::BadKey)
        ));
        assert!(a.check(Some(b"Bearer k2")).is_ok());
        assert!(a.check(Some(b"Bearer k2")).is_ok());
        match a.check(Some(b"Bearer k2")) {
            Err(GatewayError::RateLimited { retry_after }) => {
                assert!((1..=31).contains(&retry_after))
            }
            other => panic!("{other:?}"),
        }
        assert!(a.check(Some(b"Bearer k1")).is_ok());
    }
}
