//! The one way clients (the CLI, the lab, tests, scripts) dial a site's operator API: a
//! channel that presents the operator's credentials (an API token as bearer metadata) on
//! every call, to the first manager of a site that answers, over TLS when the operator
//! was given the sites' CA certificates (the managers' certificates are checked against
//! them).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tandem_core::access::BearerToken;
use tandem_tls::dial::TlsDial;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderValue, Request, Response, header::AUTHORIZATION};
use tonic::transport::{Channel, Endpoint};

/// The environment variable holding an API token.
pub const TOKEN_ENV: &str = "TANDEM_TOKEN";
/// The environment variable naming a file that holds an API token.
pub const TOKEN_FILE_ENV: &str = "TANDEM_TOKEN_FILE";
/// The environment variable naming a file of CA certificates (PEM) the managers'
/// certificates must chain to; without one, the client speaks plaintext (`--insecure`
/// sites).
pub const CA_FILE_ENV: &str = "TANDEM_CA_FILE";

/// Why no channel could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no manager reachable ({0})")]
    Unreachable(String),
    #[error("{0}")]
    Credentials(String),
}

/// What a client presents on each call, and whom it trusts. Its Debug never shows the
/// token.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<HeaderValue>,
    /// TLS trusting the sites' CAs (None: plaintext).
    tls: Option<Arc<tandem_tls::ClientConfig>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.authorization.is_some() {
            "<token>"
        } else {
            "none"
        };
        let tls = if self.tls.is_some() {
            "tls"
        } else {
            "plaintext"
        };
        write!(f, "Credentials({token}, {tls})")
    }
}

/// Reads a small file the operator named (a token, CA certificates).
fn read_small(path: &Path, what: &str) -> Result<String, ConnectError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ConnectError::Credentials(format!("{}: {e}", path.display())))?;
    if meta.len() > 256 * 1024 {
        return Err(ConnectError::Credentials(format!(
            "{}: too large for {what}",
            path.display()
        )));
    }
    std::fs::read_to_string(path)
        .map_err(|e| ConnectError::Credentials(format!("{}: {e}", path.display())))
}

impl Credentials {
    /// None: calls go without a token (health probes; anything else is refused).
    pub fn none() -> Self {
        Self::default()
    }

    /// A token as the operator holds it; checked for shape here, so a typo is caught before
    /// the first call.
    pub fn token(token: &str) -> Result<Self, ConnectError> {
        let bearer = BearerToken::parse(token)
            .map_err(|e| ConnectError::Credentials(format!("API token: {e}")))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", bearer.reveal()))
            .map_err(|e| ConnectError::Credentials(e.to_string()))?;
        value.set_sensitive(true);
        Ok(Self {
            authorization: Some(value),
            tls: None,
        })
    }

    /// These credentials, over TLS trusting the CA certificates in `path` (the sites'
    /// `ca.crt`, one after another).
    pub fn with_ca_file(mut self, path: &Path) -> Result<Self, ConnectError> {
        let pem = read_small(path, "CA certificates")?;
        let tls = tandem_tls::config::operator_client(&pem)
            .map_err(|e| ConnectError::Credentials(format!("{}: {e}", path.display())))?;
        self.tls = Some(tls);
        Ok(self)
    }

    /// These credentials, over TLS with `tls` (e.g. pinned to one CA, for a first
    /// contact).
    pub fn with_tls(mut self, tls: Arc<tandem_tls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A token read from a file (as the site writes its first admin token).
    pub fn token_file(path: &Path) -> Result<Self, ConnectError> {
        // Bounded: a token file holds one short line.
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 4096) {
            return Err(ConnectError::Credentials(format!(
                "{}: too large for a token file",
                path.display()
            )));
        }
        let text = read_small(path, "a token file")?;
        Self::token(&text)
            .map_err(|e| ConnectError::Credentials(format!("{}: {e}", path.display())))
    }

    /// `TANDEM_TOKEN`, else the file `TANDEM_TOKEN_FILE` names, else none.
    pub fn token_from_env() -> Result<Self, ConnectError> {
        if let Ok(t) = std::env::var(TOKEN_ENV)
            && !t.trim().is_empty()
        {
            return Self::token(&t);
        }
        if let Some(p) = std::env::var_os(TOKEN_FILE_ENV) {
            return Self::token_file(&PathBuf::from(p));
        }
        Ok(Self::none())
    }

    /// [`Self::token_from_env`], over TLS when `TANDEM_CA_FILE` names the sites' CA
    /// certificates.
    pub fn from_env() -> Result<Self, ConnectError> {
        let credentials = Self::token_from_env()?;
        match std::env::var_os(CA_FILE_ENV) {
            Some(p) if !p.is_empty() => credentials.with_ca_file(&PathBuf::from(p)),
            _ => Ok(credentials),
        }
    }

    pub fn has_token(&self) -> bool {
        self.authorization.is_some()
    }
}

/// Reads the token in `path`, or writes `fresh()` there (created new, mode 0600) when the
/// file does not exist: how a site's first admin token is handed to its operator.
pub fn read_or_create_token_file(
    path: &Path,
    fresh: impl FnOnce() -> BearerToken,
) -> std::io::Result<BearerToken> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let invalid = |e: tandem_core::access::TokenRejected| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    };
    match std::fs::read_to_string(path) {
        Ok(text) => BearerToken::parse(&text).map_err(invalid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = fresh();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(format!("{}\n", token.reveal()).as_bytes())?;
            f.sync_all()?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

static DEFAULT: RwLock<Option<Credentials>> = RwLock::new(None);

/// Sets the credentials [`ApiConnector::default`] presents, for the whole process (the
/// CLI's, or a lab's in its harness).
pub fn set_default_credentials(c: Credentials) {
    *DEFAULT.write().unwrap_or_else(|e| e.into_inner()) = Some(c);
}

fn default_credentials() -> Credentials {
    DEFAULT
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Dials the operator API.
#[derive(Debug, Clone)]
pub struct ApiConnector {
    credentials: Credentials,
    connect_timeout: Duration,
    timeout: Duration,
}

impl Default for ApiConnector {
    /// With the process's default credentials, 3 s to connect and 30 s per call.
    fn default() -> Self {
        Self::new(default_credentials())
    }
}

impl ApiConnector {
    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials,
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn with_timeouts(mut self, connect: Duration, call: Duration) -> Self {
        self.connect_timeout = connect;
        self.timeout = call;
        self
    }

    fn endpoint(&self, addr: &str) -> Result<Endpoint, String> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        Ok(Endpoint::from_shared(uri)
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true))
    }

    /// A channel to the first of `endpoints` that accepts a connection (any manager of a
    /// site forwards to its leader).
    pub async fn connect(&self, endpoints: &[String]) -> Result<ApiChannel, ConnectError> {
        let mut errors = Vec::new();
        for e in endpoints {
            match self.endpoint(e) {
                Ok(ep) => {
                    let connected = match &self.credentials.tls {
                        Some(tls) => ep.connect_with_connector(TlsDial::new(tls.clone())).await,
                        None => ep.connect().await,
                    };
                    match connected {
                        Ok(ch) => return Ok(self.wrap(ch)),
                        Err(err) => errors.push(format!("{e}: {}", with_causes(&err))),
                    }
                }
                Err(err) => errors.push(err),
            }
        }
        Err(ConnectError::Unreachable(if errors.is_empty() {
            "no endpoint given; use --endpoint or TANDEM_ENDPOINT".to_string()
        } else {
            errors.join("; ")
        }))
    }

    /// A channel to `addr` that connects on first use.
    pub fn lazy(&self, addr: &str) -> Result<ApiChannel, ConnectError> {
        let ep = self.endpoint(addr).map_err(ConnectError::Unreachable)?;
        Ok(self.wrap(match &self.credentials.tls {
            Some(tls) => ep.connect_with_connector_lazy(TlsDial::new(tls.clone())),
            None => ep.connect_lazy(),
        }))
    }

    fn wrap(&self, channel: Channel) -> ApiChannel {
        ApiChannel {
            channel,
            authorization: self.credentials.authorization.clone(),
        }
    }
}

/// An error with its causes (tonic's transport error alone says only "transport error").
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// A channel that presents the caller's token on every call; use it as any tonic
/// client's transport.
#[derive(Clone, Debug)]
pub struct ApiChannel {
    channel: Channel,
    authorization: Option<HeaderValue>,
}

impl Service<Request<Body>> for ApiChannel {
    type Response = Response<Body>;
    type Error = <Channel as Service<Request<Body>>>::Error;
    type Future = <Channel as Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<Body>>::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        if let Some(v) = &self.authorization {
            req.headers_mut().insert(AUTHORIZATION, v.clone());
        }
        self.channel.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_check_the_token_and_never_show_it() {
        let t = BearerToken::from_random([1; 6], [2; 32]).reveal();
        let c = Credentials::token(&format!("{t}\n")).unwrap();
        assert!(c.has_token());
        assert!(!format!("{c:?}").contains(&t[10..]));
        assert!(Credentials::token("hunter2").is_err());
        let dir = std::env::temp_dir().join(format!("tandem-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "x".repeat(5000)).unwrap();
        assert!(Credentials::token_file(&f).is_err());
        std::fs::write(&f, &t).unwrap();
        assert!(Credentials::token_file(&f).unwrap().has_token());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_token_file_is_created_once_owner_only_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tandem-tokfile-{}", std::process::id()));
        let path = dir.join("secrets/admin.token");
        let first =
            read_or_create_token_file(&path, || BearerToken::from_random([3; 6], [4; 32])).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = read_or_create_token_file(&path, || unreachable!("the file exists"));
        assert_eq!(again.unwrap(), first);
        std::fs::write(&path, "not a token").unwrap();
        assert!(read_or_create_token_file(&path, || unreachable!()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
