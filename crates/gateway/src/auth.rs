//! API keys (from the `api-keys` systemd credential) and per-key rate limits.
//!
//! Keys are at least [`MIN_KEY_LEN`] characters (issue 12, item 4: a
//! one-character key was accepted), compared in constant time and never
//! logged; an error about a key names its line, never its text.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{GatewayError, StartError};
use crate::ratelimit::KeyLimiter;

/// The shortest API key accepted.
pub const MIN_KEY_LEN: usize = 32;

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

/// One API key and its name (the `key` label of
/// `citadel_gateway_key_requests_total`). `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub secret: Vec<u8>,
    pub name: String,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({})", self.name)
    }
}

/// The longest key name.
pub const MAX_NAME_LEN: usize = 64;

/// `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most [`MAX_NAME_LEN`] characters.
fn valid_name(s: &str) -> bool {
    s.len() <= MAX_NAME_LEN
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Splits a key line into its name and key: `NAME: KEY` (a colon, then
/// blanks) names the key; a line without `:` followed by a blank is a key
/// alone (the format before names, still read the same). `Err` when the
/// text before such a colon is not a valid name.
fn split_named(line: &str) -> Result<(Option<&str>, &str), ()> {
    let colon = line
        .char_indices()
        .find(|&(i, c)| c == ':' && line[i + 1..].starts_with([' ', '\t']));
    match colon {
        None => Ok((None, line)),
        Some((i, _)) => {
            let name = line[..i].trim();
            if valid_name(name)
                && !matches!(
                    name,
                    crate::metrics::KEY_NONE | crate::metrics::KEY_UNAUTHENTICATED
                )
            {
                Ok((Some(name), line[i + 1..].trim()))
            } else {
                Err(())
            }
        }
    }
}

/// Reads API keys: one per line, `KEY` or `NAME: KEY`, `#` comments and
/// blank lines ignored. A key without a name is named `key-LINE`. Errors
/// never include file contents.
pub fn read_keys(path: &Path, host_file: &Path) -> Result<Vec<ApiKey>, StartError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StartError::Config(format!(
            "cannot read API keys from {} (credential `{}`, host file {}): {e}",
            path.display(),
            citadel_config::Gateway::API_KEYS_CREDENTIAL,
            host_file.display()
        ))
    })?;
    let mut keys: Vec<ApiKey> = Vec::new();
    let mut short = Vec::new();
    let mut bad_names = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let Ok((name, key)) = split_named(l) else {
            bad_names.push(format!("line {}", n + 1));
            continue;
        };
        let len = key.chars().count();
        if len < MIN_KEY_LEN {
            short.push(format!("line {}: {len} characters", n + 1));
        }
        keys.push(ApiKey {
            secret: key.as_bytes().to_vec(),
            name: name.map_or_else(|| format!("key-{}", n + 1), str::to_owned),
        });
    }
    if !bad_names.is_empty() {
        return Err(StartError::Config(format!(
            "{} (credential `{}`, host file {}): invalid key names ({}): a named key is written \
             `NAME: KEY`, NAME being 1 to {MAX_NAME_LEN} letters, digits, `_`, `.` or `-` (starting \
             with a letter or digit; not `none` or `unauthenticated`)",
            path.display(),
            citadel_config::Gateway::API_KEYS_CREDENTIAL,
            host_file.display(),
            bad_names.join(", ")
        )));
    }
    if !short.is_empty() {
        return Err(StartError::Config(format!(
            "{} (credential `{}`, host file {}) holds API keys shorter than {MIN_KEY_LEN} characters ({}): \
             short keys can be guessed. Replace them with random keys of at least {MIN_KEY_LEN} characters, \
             e.g. the output of `systemd-id128 new` or `openssl rand -hex 32` (`citadel-systemd install` \
             generates one when the file is missing), then `citadel-systemd reload`",
            path.display(),
            citadel_config::Gateway::API_KEYS_CREDENTIAL,
            host_file.display(),
            short.join(", ")
        )));
    }
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

fn names(keys: &[ApiKey]) -> Vec<crate::metrics::Name> {
    keys.iter()
        .map(|k| crate::metrics::Name::new(&k.name))
        .collect()
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
    keys: Vec<ApiKey>,
    /// The keys' names as label values, by index.
    names: Vec<crate::metrics::Name>,
    limiter: Arc<KeyLimiter>,
}

impl Auth {
    pub fn new(keys: Vec<ApiKey>, per_minute: u32, burst: u32) -> Auth {
        Auth {
            limiter: Arc::new(KeyLimiter::new(per_minute, burst)),
            names: names(&keys),
            keys,
        }
    }

    /// Carries the old limiter's state over a reload, by key: a key that
    /// stays keeps its state (re-scaled when the limits change), a removed
    /// key's state is dropped once the new `Auth` is in use, a new key starts
    /// with its full burst. Changes nothing until the new `Auth` is used.
    pub fn reloaded(old: Option<&Auth>, keys: Vec<ApiKey>, per_minute: u32, burst: u32) -> Auth {
        match old {
            Some(o) => Auth {
                limiter: Arc::new(o.limiter.reloaded(
                    per_minute,
                    burst,
                    keys.iter().map(|k| k.secret.as_slice()),
                )),
                names: names(&keys),
                keys,
            },
            None => Auth::new(keys, per_minute, burst),
        }
    }

    /// Finds the key of `Authorization: Bearer KEY` (its index), without
    /// touching its rate limit.
    pub fn verify(&self, authorization: Option<&[u8]>) -> Result<usize, GatewayError> {
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
            if ct_eq(&k.secret, token) {
                found = Some(i);
            }
        }
        found.ok_or(GatewayError::BadKey)
    }

    /// The name of key `idx` (as a label value).
    pub fn name(&self, idx: usize) -> Option<&crate::metrics::Name> {
        self.names.get(idx)
    }

    /// Counts one request against key `idx`'s rate limit.
    pub fn admit(&self, idx: usize) -> Result<(), GatewayError> {
        let Some(key) = self.keys.get(idx) else {
            return Err(GatewayError::BadKey);
        };
        self.limiter
            .check(&key.secret)
            .map_err(|retry_after| GatewayError::RateLimited { retry_after })
    }

    /// Checks `Authorization: Bearer KEY` and the key's rate limit.
    #[cfg(test)]
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), GatewayError> {
        let idx = self.verify(authorization)?;
        self.admit(idx)
    }
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
        let key = |k: &str| ApiKey {
            secret: k.as_bytes().to_vec(),
            name: k.to_owned(),
        };
        let a = Auth::new(vec![key("k1"), key("k2")], 2, 2);
        assert!(matches!(a.check(None), Err(GatewayError::MissingKey)));
        assert!(matches!(
            a.check(Some(b"Bearer nope")),
            Err(GatewayError::BadKey)
        ));
        assert!(a.check(Some(b"Bearer k2")).is_ok());
        assert!(a.check(Some(b"Bearer k2")).is_ok());
        match a.check(Some(b"Bearer k2")) {
            // Burst 2 of 2 per minute: the next one in 60 s.
            Err(GatewayError::RateLimited { retry_after }) => {
                assert!((59..=60).contains(&retry_after), "{retry_after}")
            }
            other => panic!("{other:?}"),
        }
        assert!(a.check(Some(b"Bearer k1")).is_ok());
    }
}

#[cfg(test)]
mod issue12 {
    use super::*;

    /// Review of issue 12, item 2: with 100/min and burst 10, 12 quick
    /// requests gave 10x200 + 2x429; a reload that added a key reset the
    /// limit and the next 12 got 10x200 again. A surviving key now keeps its
    /// state (the same key on another line too), a new key gets its burst.
    #[test]
    fn review_reload_keeps_a_surviving_keys_rate_limit() {
        let k = |c: char, name: &str| ApiKey {
            secret: c.to_string().repeat(MIN_KEY_LEN).into_bytes(),
            name: name.to_owned(),
        };
        let bearer = |c: char| format!("Bearer {}", c.to_string().repeat(MIN_KEY_LEN));
        let burst = |a: &Auth, c: char| {
            (0..12)
                .filter(|_| a.check(Some(bearer(c).as_bytes())).is_ok())
                .count()
        };
        let old = Auth::new(vec![k('a', "alice")], 100, 10);
        assert_eq!(burst(&old, 'a'), 10);
        let new = Auth::reloaded(Some(&old), vec![k('b', "bob"), k('a', "alice")], 100, 10);
        assert!(burst(&new, 'a') <= 2, "the reload reset the surviving key");
        assert_eq!(burst(&new, 'b'), 10);
        let limits = Auth::reloaded(Some(&new), vec![k('a', "alice")], 120, 10);
        assert!(burst(&limits, 'a') <= 2, "a change of limits reset the key");
    }

    fn keys_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api-keys");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    /// Issue 12, item 4: a one-character key was accepted. Short keys are
    /// refused (naming their lines, never their text) with how to make one.
    #[test]
    fn issue12_short_keys_are_refused_at_load() {
        let secret = "k";
        let good = "a".repeat(MIN_KEY_LEN);
        let (_d, p) = keys_file(&format!(
            "# keys\n{good}\n\n{secret}\n  short-but-secret  \n"
        ));
        let err = read_keys(&p, Path::new("/etc/citadel/credentials/api-keys")).unwrap_err();
        assert_eq!(err.exit_code(), StartError::EXIT_CONFIG);
        let msg = err.to_string();
        for want in [
            "line 4: 1 characters",
            "line 5: 16 characters",
            "at least 32 characters",
            "systemd-id128 new",
            "/etc/citadel/credentials/api-keys",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
        assert!(
            !msg.contains("short-but-secret") && !msg.contains(&good),
            "{msg}"
        );
        let (_d, p) = keys_file(&format!("{good}\n{}\n", "b".repeat(40)));
        assert_eq!(read_keys(&p, Path::new("x")).unwrap().len(), 2);
    }
}

#[cfg(test)]
mod issue14 {
    use super::*;

    /// Issue 14, item 1: keys get optional names (`NAME: KEY`) for the
    /// per-key metrics; a file without names reads as before, each key named
    /// `key-LINE`; a bad name is refused naming its line, never the key.
    #[test]
    fn issue14_key_names_are_optional_and_backward_compatible() {
        let k = |c: char| c.to_string().repeat(MIN_KEY_LEN);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api-keys");
        let colon_key = format!("{}:{}", k('c'), k('d'));
        std::fs::write(
            &p,
            format!(
                "# keys\n{}\nalice: {}\n\n  bob.ci-2:\t{}  \n{colon_key}\n",
                k('a'),
                k('b'),
                k('e')
            ),
        )
        .unwrap();
        let keys = read_keys(&p, Path::new("x")).unwrap();
        let got: Vec<(String, String)> = keys
            .iter()
            .map(|k| (k.name.clone(), String::from_utf8(k.secret.clone()).unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("key-2".to_owned(), k('a')),
                ("alice".to_owned(), k('b')),
                ("bob.ci-2".to_owned(), k('e')),
                ("key-6".to_owned(), colon_key),
            ]
        );
        // Debug never shows a key.
        assert_eq!(format!("{:?}", keys[1]), "ApiKey(alice)");
        let auth = Auth::new(keys, 10, 10);
        let idx = auth
            .verify(Some(format!("Bearer {}", k('b')).as_bytes()))
            .unwrap();
        assert_eq!(auth.name(idx).unwrap().as_str(), "alice");

        for bad in [
            format!("a b: {}", k('s')),
            format!("none: {}", k('s')),
            format!("-x: {}", k('s')),
        ] {
            std::fs::write(&p, format!("{}\n{bad}\n", k('a'))).unwrap();
            let msg = read_keys(&p, Path::new("x")).unwrap_err().to_string();
            assert!(msg.contains("invalid key names (line 2)"), "{msg}");
            assert!(!msg.contains(&k('s')) && !msg.contains(&k('a')), "{msg}");
        }
        // A short key behind a name is still refused.
        std::fs::write(&p, "carol: short\n").unwrap();
        let msg = read_keys(&p, Path::new("x")).unwrap_err().to_string();
        assert!(msg.contains("line 1: 5 characters"), "{msg}");
    }
}
