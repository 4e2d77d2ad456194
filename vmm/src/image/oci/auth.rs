//! Registry credentials, from where Docker and GitLab keep them: the JSON in
//! `$DOCKER_AUTH_CONFIG` (what a GitLab CI variable of that name holds), else
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. Both have the shape
//! `{"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}` (or `username` and
//! `password` fields). Without an entry for the registry, the pull is anonymous, which
//! still takes a bearer token where the registry hands them out to anyone.

use std::path::PathBuf;

use base64::Engine;

/// The variable holding a whole config.json.
pub const AUTH_CONFIG_ENV: &str = "DOCKER_AUTH_CONFIG";

/// A user name and password for one registry, and where they came from.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub from: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({} from {})", self.username, self.from)
    }
}

/// A credentials source that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the registry credentials in {from}: {reason}")]
pub struct AuthConfigError {
    pub from: String,
    pub reason: String,
}

/// The credentials for `registry` (as the reference names it, e.g. `docker.io`,
/// `ghcr.io`, `127.0.0.1:5000`), if any source has them.
pub fn lookup(registry: &str) -> Result<Option<Credentials>, AuthConfigError> {
    if let Some(json) = std::env::var_os(AUTH_CONFIG_ENV).filter(|v| !v.is_empty()) {
        let from = format!("${AUTH_CONFIG_ENV}");
        return find(&json.to_string_lossy(), registry, &from);
    }
    let Some(path) = config_path() else {
        return Ok(None);
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => find(&text, registry, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuthConfigError {
            from: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

fn config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
    Some(PathBuf::from(home).join(".docker/config.json"))
}

/// The entry for `registry` in the config.json text `json`.
fn find(json: &str, registry: &str, from: &str) -> Result<Option<Credentials>, AuthConfigError> {
    let bad = |reason: String| AuthConfigError {
        from: from.to_string(),
        reason,
    };
    let config: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let wanted = canonical(registry);
    let Some(entry) = auths
        .iter()
        .find(|(key, _)| canonical(key) == wanted)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    let field = |name: &str| entry.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let (username, password) = if !field("auth").is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(field("auth").trim())
            .map_err(|e| bad(format!("the \"auth\" of {registry} is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| bad(format!("the \"auth\" of {registry} is not UTF-8")))?;
        let Some((user, pass)) = text.split_once(':') else {
            return Err(bad(format!(
                "the \"auth\" of {registry} is not base64 of USER:PASSWORD"
            )));
        };
        (user.to_string(), pass.to_string())
    } else if !field("username").is_empty() {
        (field("username").to_string(), field("password").to_string())
    } else {
        return Err(bad(format!(
            "the entry for {registry} has neither \"auth\" nor \"username\" (credential \
             helpers and identity tokens are not supported)"
        )));
    };
    Ok(Some(Credentials {
        username,
        password,
        from: from.to_string(),
    }))
}

/// A registry key as config.json files write it (`https://index.docker.io/v1/`,
/// `registry.example:5000`) reduced to its host, Docker Hub's aliases to one.
fn canonical(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_by_host_and_decoded() {
        let json = r#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dTpw"},
            "127.0.0.1:5000": {"username": "kiln", "password": "s:cret"},
            "bad.example": {"auth": "!!"},
            "none.example": {}
        }}"#;
        let c = find(json, "docker.io", "f").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p"));
        let c = find(json, "127.0.0.1:5000", "f").unwrap().unwrap();
        assert_eq!(c.password, "s:cret");
        assert!(find(json, "ghcr.io", "f").unwrap().is_none());
        let e = find(json, "bad.example", "f").unwrap_err().to_string();
        assert!(e.contains("not base64"), "{e}");
        let e = find(json, "none.example", "f").unwrap_err().to_string();
        assert!(e.contains("credential helpers"), "{e}");
        assert!(find("{", "x", "f").is_err());
    }
}
