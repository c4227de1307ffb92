//! Who is asking: a verified client certificate (from the TLS layer), a
//! bearer token from the static token file or the node join token, a
//! service-account token this server signed, or the server itself (the
//! in-process client). Anyone else gets 401, except on
//! the public health and version endpoints, as upstream.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::status::ApiError;
use super::tls::PeerInfo;
use super::{ApiState, service_accounts};

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// Marks a request made by the server's own components through the
/// in-process client; it is trusted as `system:apiserver`.
#[derive(Clone, Copy, Debug)]
pub struct InProcess;

pub struct Authenticator {
    tokens: HashMap<String, User>,
    /// Where service-account tokens are checked (key, accounts, pods).
    service_accounts: Option<Arc<ApiState>>,
}

/// Paths anyone may read, as upstream's `system:public-info-viewer`.
const PUBLIC: &[&str] = &["/healthz", "/livez", "/readyz", "/version", "/version/"];

impl Authenticator {
    pub fn new() -> Self {
        Authenticator {
            tokens: HashMap::new(),
            service_accounts: None,
        }
    }

    /// Accepts the service-account tokens `state`'s key signed.
    pub fn accept_service_account_tokens(&mut self, state: Arc<ApiState>) {
        self.service_accounts = Some(state);
    }

    /// Accepts `token` as `user`.
    pub fn add_token(&mut self, token: &str, user: User) {
        self.tokens.insert(token.to_owned(), user);
    }

    /// Reads a static token file in upstream's `--token-auth-file` format:
    /// `token,user,uid[,"group1,group2"]` per line. A missing file is no
    /// tokens; a malformed line is an error naming it.
    pub fn load_token_file(&mut self, path: &Path) -> Result<(), String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (token, rest) = line
                .split_once(',')
                .ok_or_else(|| format!("{}:{}: expected token,user,uid", path.display(), n + 1))?;
            let mut fields = rest.splitn(3, ',');
            let name = fields.next().unwrap_or_default().trim();
            let _uid = fields.next();
            let groups = fields
                .next()
                .map(|g| {
                    g.trim()
                        .trim_matches('"')
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            if token.is_empty() || name.is_empty() {
                return Err(format!("{}:{}: empty token or user", path.display(), n + 1));
            }
            self.add_token(
                token,
                User {
                    name: name.to_owned(),
                    groups,
                },
            );
        }
        Ok(())
    }

    fn user_for(&self, request: &Request) -> Option<User> {
        if request.extensions().get::<InProcess>().is_some() {
            return Some(User {
                name: "system:apiserver".into(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
            });
        }
        if let Some(identity) = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.identity.as_ref())
        {
            let mut groups = identity.groups.clone();
            groups.push("system:authenticated".into());
            return Some(User {
                name: identity.user.clone(),
                groups,
            });
        }
        let token = bearer(request)?;
        self.tokens.get(token).map(|user| {
            let mut user = user.clone();
            user.groups.push("system:authenticated".into());
            user
        })
    }
}

impl Default for Authenticator {
    fn default() -> Self {
        Authenticator::new()
    }
}

fn bearer(request: &Request) -> Option<&str> {
    let header = request.headers().get(http::header::AUTHORIZATION)?;
    Some(header.to_str().ok()?.strip_prefix("Bearer ")?.trim())
}

/// The middleware: attaches the [`User`] or answers 401.
pub async fn authenticate(
    State(auth): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let mut user = auth.user_for(&request);
    if user.is_none()
        && let Some(state) = &auth.service_accounts
        && let Some(token) = bearer(&request).filter(|t| t.split('.').count() == 3)
    {
        user = service_accounts::authenticate(state, token)
            .await
            .map(|mut user| {
                user.groups.push("system:authenticated".into());
                user
            });
    }
    match user {
        Some(user) => {
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None if PUBLIC.contains(&request.uri().path()) => next.run(request).await,
        None => ApiError::unauthorized().into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        std::fs::write(&path, "# comment\nabc123,alice,1,\"dev,ops\"\nxyz,bob,2\n").unwrap();
        let mut auth = Authenticator::new();
        auth.load_token_file(&path).unwrap();
        assert_eq!(auth.tokens["abc123"].groups, vec!["dev", "ops"]);
        assert_eq!(auth.tokens["xyz"].name, "bob");
        std::fs::write(&path, "nocomma\n").unwrap();
        assert!(Authenticator::new().load_token_file(&path).is_err());
    }
}
