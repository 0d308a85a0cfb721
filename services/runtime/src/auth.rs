//! Who is calling: every gRPC call is authenticated, then held to the
//! access policy ([`crate::access`]), in one tower layer every service's
//! server runs ([`AuthLayer`]).
//!
//! Two kinds of credentials name a [`Principal`]:
//!
//! - **a client certificate** (mutual TLS), for services and internal
//!   systems: signed by the installation's CA, its common name is
//!   `<role>:<id>`, e.g. `service:routing` or `intake_system:callcentre`;
//! - **a signed token** (`authorization: Bearer <JWT>`, Ed25519), for crew
//!   phones and operators: issued by the installation's token key
//!   ([`TokenIssuer`]), expiring, naming the subject, its role and, for a
//!   phone, its crew and device.
//!
//! A call with neither is `UNAUTHENTICATED`; an expired or forged token, or
//! a certificate naming no declared role, is `UNAUTHENTICATED` with the
//! reason; a call outside the role is `PERMISSION_DENIED` naming the role
//! and the RPC. Health and reflection are open ([`crate::access::OPEN_SERVICES`]).
//! The principal rides on the request (`tonic::Request::extensions`) for
//! the service's finer checks (a crew's own orders) and for the events'
//! actor ([`principal_of`]).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::access::{AccessPolicy, OPEN_SERVICES};

/// The issuer and audience every Lineguard token names.
pub const TOKEN_ISSUER: &str = "lineguard";
/// Longest a token may live: a phone's token is renewed daily at most.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3_600);
/// Clock difference between issuer and service tolerated on `exp`/`nbf`.
pub const TOKEN_LEEWAY_SECONDS: u64 = 30;
/// Longest `authorization` header read.
pub const MAX_AUTHORIZATION_BYTES: usize = 4 * 1024;
/// Longest principal id (certificate or token subject).
pub const MAX_PRINCIPAL_ID_BYTES: usize = 128;
/// Binary metadata carrying the caller one instance of a service relays
/// to another partition of the same service ([`crate::partitions`]).
pub const RELAYED_CALLER_METADATA: &str = "x-lineguard-relayed-caller-bin";
/// Metadata naming the instance that forwarded a call and the partitions
/// it counts: `<bus name>/<partitions>`, e.g. `intake-p1/2`.
pub const FORWARDED_BY_METADATA: &str = "x-lineguard-forwarded-by";
/// Longest relayed caller or forwarded-by value read.
const MAX_RELAY_METADATA_BYTES: usize = 1_024;

/// A call another partition of this service forwarded here: it is answered
/// here and never forwarded again (no loops), by the caller it relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The forwarding instance's bus name (`intake-p1`).
    pub by: String,
    /// How many partitions the forwarding instance counts: two instances
    /// that count differently disagree on every owner.
    pub partitions: u16,
}

impl Forwarded {
    /// The metadata value saying `by` (counting `partitions`) forwarded it.
    pub fn header_value(by: &str, partitions: u16) -> String {
        format!("{by}/{partitions}")
    }

    fn parse(value: &[u8]) -> Result<Forwarded, Status> {
        let bad = || {
            Status::invalid_argument(format!(
                "{FORWARDED_BY_METADATA}: expected <instance>/<partitions>"
            ))
        };
        if value.len() > MAX_RELAY_METADATA_BYTES {
            return Err(bad());
        }
        let text = std::str::from_utf8(value).map_err(|_| bad())?;
        let (by, partitions) = text.rsplit_once('/').ok_or_else(bad)?;
        Ok(Forwarded {
            by: by.to_string(),
            partitions: partitions.parse().map_err(|_| bad())?,
        })
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A client certificate signed by the installation's CA.
    Certificate,
    /// A token signed by the installation's token key.
    Token,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Who: a service, a system, a person, a phone.
    pub id: String,
    /// Its role in the access policy.
    pub role: String,
    /// For a crew's phone: the crew it acts for (empty otherwise).
    pub crew_id: String,
    /// For a phone: its device id (empty otherwise).
    pub device_id: String,
    /// How it proved it.
    pub credential: Credential,
}

impl Principal {
    /// This caller as [`RELAYED_CALLER_METADATA`] carries it: its fields
    /// joined by NUL, which no field can hold (ids come from certificates
    /// and signed tokens and are checked again on arrival).
    pub fn relayed(&self) -> Vec<u8> {
        let credential = match self.credential {
            Credential::Certificate => "certificate",
            Credential::Token => "token",
        };
        [
            self.role.as_str(),
            &self.id,
            &self.crew_id,
            &self.device_id,
            credential,
        ]
        .join("\0")
        .into_bytes()
    }
}

/// What a Lineguard token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// The principal's id.
    pub sub: String,
    /// Its role.
    pub role: String,
    /// The crew a phone acts for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub crew: String,
    /// The phone's device id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device: String,
    /// Always [`TOKEN_ISSUER`].
    pub iss: String,
    /// Always [`TOKEN_ISSUER`].
    pub aud: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
}

/// Why credentials could not be read or made.
#[derive(Debug, thiserror::Error)]
#[error("credentials: {0}")]
pub struct CredentialError(pub String);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs tokens with the installation's Ed25519 token key (PKCS#8 PEM).
#[derive(Clone)]
pub struct TokenIssuer {
    key: EncodingKey,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenIssuer")
    }
}

impl TokenIssuer {
    /// An issuer with the private key in `pem`.
    pub fn from_pem(pem: &[u8]) -> Result<TokenIssuer, CredentialError> {
        EncodingKey::from_ed_pem(pem)
            .map(|key| TokenIssuer { key })
            .map_err(|e| CredentialError(format!("token signing key: {e}")))
    }

    /// A token for `role` `subject` (a phone: with its crew and device),
    /// valid for `lifetime` (at most [`MAX_TOKEN_LIFETIME`]).
    pub fn issue(
        &self,
        subject: &str,
        role: &str,
        crew: &str,
        device: &str,
        lifetime: Duration,
    ) -> Result<String, CredentialError> {
        if lifetime > MAX_TOKEN_LIFETIME {
            return Err(CredentialError(format!(
                "lifetime {}s: over the limit of {}s",
                lifetime.as_secs(),
                MAX_TOKEN_LIFETIME.as_secs()
            )));
        }
        let now = unix_now();
        let claims = TokenClaims {
            sub: subject.to_string(),
            role: role.to_string(),
            crew: crew.to_string(),
            device: device.to_string(),
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_ISSUER.into(),
            iat: now,
            exp: now + lifetime.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)
            .map_err(|e| CredentialError(format!("signing a token: {e}")))
    }
}

/// Checks credentials and the access policy for every call.
pub struct Authenticator {
    policy: Arc<AccessPolicy>,
    /// Token keys accepted (more than one while a key is being rotated).
    token_keys: Vec<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("policy", &self.policy.version)
            .field("token_keys", &self.token_keys.len())
            .finish()
    }
}

impl Authenticator {
    /// Checks calls against `policy`, accepting tokens signed by any of the
    /// Ed25519 public keys `token_keys_pem` (SPKI PEM).
    pub fn new(
        policy: Arc<AccessPolicy>,
        token_keys_pem: &[Vec<u8>],
    ) -> Result<Authenticator, CredentialError> {
        let token_keys = token_keys_pem
            .iter()
            .map(|pem| {
                DecodingKey::from_ed_pem(pem)
                    .map_err(|e| CredentialError(format!("token public key: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_audience(&[TOKEN_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = TOKEN_LEEWAY_SECONDS;
        Ok(Authenticator {
            policy,
            token_keys,
            validation,
        })
    }

    /// Who is calling `path`, from its client certificate (DER, as TLS
    /// verified it against the CA) or its `authorization` header.
    pub fn authenticate(
        &self,
        client_certificate: Option<&[u8]>,
        authorization: Option<&[u8]>,
    ) -> Result<Principal, Status> {
        if let Some(der) = client_certificate {
            return self.principal_from_certificate(der);
        }
        let Some(header) = authorization else {
            return Err(Status::unauthenticated(
                "no credentials: present a client certificate or an authorization: Bearer token",
            ));
        };
        if header.len() > MAX_AUTHORIZATION_BYTES {
            return Err(Status::unauthenticated(format!(
                "authorization: {} bytes, over the limit of {MAX_AUTHORIZATION_BYTES}",
                header.len()
            )));
        }
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization: expected 'Bearer <token>'"))?;
        self.principal_from_token(token.trim())
    }

    fn principal_from_certificate(&self, der: &[u8]) -> Result<Principal, Status> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            Status::unauthenticated(format!("client certificate does not parse: {e}"))
        })?;
        let common_name = certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| Status::unauthenticated("client certificate names no common name"))?;
        let (role, id) = common_name.split_once(':').ok_or_else(|| {
            Status::unauthenticated(format!(
                "client certificate common name {common_name:?} is not <role>:<id>"
            ))
        })?;
        self.principal(id, role, "", "", Credential::Certificate)
    }

    fn principal_from_token(&self, token: &str) -> Result<Principal, Status> {
        let mut last_error = None;
        for key in &self.token_keys {
            match jsonwebtoken::decode::<TokenClaims>(token, key, &self.validation) {
                Ok(data) => {
                    let c = data.claims;
                    if c.exp.saturating_sub(c.iat) > MAX_TOKEN_LIFETIME.as_secs() {
                        return Err(Status::unauthenticated(format!(
                            "token lives {}s, over the limit of {}s",
                            c.exp.saturating_sub(c.iat),
                            MAX_TOKEN_LIFETIME.as_secs()
                        )));
                    }
                    return self.principal(&c.sub, &c.role, &c.crew, &c.device, Credential::Token);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(Status::unauthenticated(match last_error {
            Some(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "token expired".to_string(),
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    "token signature does not verify".to_string()
                }
                _ => format!("token refused: {e}"),
            },
            None => "tokens are not accepted here (no token key configured)".to_string(),
        }))
    }

    fn principal(
        &self,
        id: &str,
        role: &str,
        crew_id: &str,
        device_id: &str,
        credential: Credential,
    ) -> Result<Principal, Status> {
        if id.is_empty() || id.len() > MAX_PRINCIPAL_ID_BYTES {
            return Err(Status::unauthenticated(format!(
                "principal id: 1 to {MAX_PRINCIPAL_ID_BYTES} bytes"
            )));
        }
        if !self.policy.roles().any(|r| r == role) {
            return Err(Status::unauthenticated(format!(
                "role {role:?} is not declared in the access policy {}",
                self.policy.version
            )));
        }
        if role == "crew" && crew_id.is_empty() {
            return Err(Status::unauthenticated(
                "a crew credential must name its crew",
            ));
        }
        Ok(Principal {
            id: id.to_string(),
            role: role.to_string(),
            crew_id: crew_id.to_string(),
            device_id: device_id.to_string(),
            credential,
        })
    }

    /// The caller `relayed` names ([`Principal::relayed`]), held to the same
    /// checks as one that presented its own credentials.
    fn principal_relayed(&self, relayed: &[u8]) -> Result<Principal, Status> {
        let bad = |why: &str| Status::unauthenticated(format!("{RELAYED_CALLER_METADATA}: {why}"));
        if relayed.len() > MAX_RELAY_METADATA_BYTES {
            return Err(bad("too long"));
        }
        let text = std::str::from_utf8(relayed).map_err(|_| bad("not UTF-8"))?;
        let fields: Vec<&str> = text.split('\0').collect();
        let [role, id, crew_id, device_id, credential] = fields[..] else {
            return Err(bad("expected five fields"));
        };
        let credential = match credential {
            "certificate" => Credential::Certificate,
            "token" => Credential::Token,
            _ => return Err(bad("unknown credential")),
        };
        self.principal(id, role, crew_id, device_id, credential)
    }

    /// The caller of a call that carries relay metadata: the relayed one,
    /// but only when the connection's own caller is `service:<service>`
    /// by certificate (another instance of this very service). Anyone else
    /// asking to be taken for somebody else is refused.
    fn relayed_caller(
        &self,
        service: &str,
        connection: &Principal,
        relayed: Option<&[u8]>,
    ) -> Result<Principal, Status> {
        let own_instance = connection.role == "service"
            && connection.id == service
            && connection.credential == Credential::Certificate;
        if !own_instance {
            return Err(Status::permission_denied(format!(
                "{} ({}) may not forward calls: only {service}'s own instances relay a caller",
                connection.id, connection.role
            )));
        }
        match relayed {
            Some(relayed) => self.principal_relayed(relayed),
            None => Err(Status::unauthenticated(format!(
                "a forwarded call carries its caller in {RELAYED_CALLER_METADATA}"
            ))),
        }
    }

    /// Whether `principal` may call `path` (`/package.Service/Method`).
    pub fn authorize(&self, principal: &Principal, path: &str) -> Result<(), Status> {
        self.policy
            .check(&principal.role, path)
            .map_err(|denied| Status::permission_denied(denied.to_string()))
    }

    /// Whether `path` is open to every caller (health, reflection).
    pub fn is_open(path: &str) -> bool {
        let rpc = path.strip_prefix('/').unwrap_or(path);
        let service = rpc.split_once('/').map_or(rpc, |(service, _)| service);
        OPEN_SERVICES.contains(&service)
    }
}

/// The caller of a request, as the [`AuthLayer`] authenticated it.
pub fn principal_of<T>(request: &tonic::Request<T>) -> Result<&Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// The caller of a request, if the server authenticates calls.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<Principal> {
    request.extensions().get::<Principal>().cloned()
}

/// The actor a principal's event records: its kind by role (a crew's
/// phone is its crew, an intake system a channel, a service the system,
/// anyone else a person) and the id `<role>-<id>` (a phone:
/// `<crew>-<device or id>`), with any character an actor id may not hold
/// made `_`. The principal, never a request field, is who acted.
pub fn actor_of(principal: &Principal) -> lineguard_eventlog::Actor {
    use lineguard_eventlog::ActorKind;
    let (kind, id) = match principal.role.as_str() {
        "crew" => {
            let device = if principal.device_id.is_empty() {
                &principal.id
            } else {
                &principal.device_id
            };
            (ActorKind::Crew, format!("{}-{device}", principal.crew_id))
        }
        "intake_system" => (
            ActorKind::Channel,
            format!("intake_system-{}", principal.id),
        ),
        "service" => (ActorKind::System, principal.id.clone()),
        role => (ActorKind::Person, format!("{role}-{}", principal.id)),
    };
    let id: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    lineguard_eventlog::actor(kind, id)
}

/// Who acted, for an event: the authenticated principal ([`actor_of`]),
/// or, on a server without credentials (development on loopback), the
/// actor the request names.
pub fn acting(
    principal: Option<&Principal>,
    named: lineguard_eventlog::Actor,
) -> lineguard_eventlog::Actor {
    principal.map_or(named, actor_of)
}

/// Whether `caller` may act for `crew_id`: a crew's phone acts for its own
/// crew only (another crew's stream or order is `PERMISSION_DENIED`,
/// whatever the request says); any other role the policy lets call the RPC
/// (a dispatcher, an administrator) acts for any crew. Without a caller
/// (a server without credentials) there is nothing to check.
pub fn check_crew(caller: Option<&Principal>, crew_id: &str) -> Result<(), Status> {
    match caller {
        Some(p) if p.role == "crew" && p.crew_id != crew_id => {
            Err(Status::permission_denied(format!(
                "crew_id: {} acts for crew {}, not for crew {crew_id}",
                p.id, p.crew_id
            )))
        }
        _ => Ok(()),
    }
}

/// The tower layer authenticating and authorizing every call.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    /// None: a server without credentials (loopback only; see
    /// [`crate::CommonArgs::credentials`]) lets calls through unchecked.
    authenticator: Option<Arc<Authenticator>>,
    /// The service served: its own instances (`service:<it>`) may forward
    /// a call with its caller relayed.
    service: &'static str,
}

impl AuthLayer {
    /// A layer checking calls to `service` with `authenticator`.
    pub fn new(authenticator: Arc<Authenticator>, service: &'static str) -> AuthLayer {
        AuthLayer {
            authenticator: Some(authenticator),
            service,
        }
    }

    /// A layer that checks nothing, for a server without credentials (a
    /// forwarded call is still marked as such, so it is not forwarded on).
    pub fn disabled(service: &'static str) -> AuthLayer {
        AuthLayer {
            authenticator: None,
            service,
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
            service: self.service,
        }
    }
}

/// A service wrapped by [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Option<Arc<Authenticator>>,
    service: &'static str,
}

/// The client certificate TLS verified for this connection, if any.
fn client_certificate<B>(request: &http::Request<B>) -> Option<Vec<u8>> {
    request
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()))
}

impl<S, B> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let forwarded = match request.headers().get(FORWARDED_BY_METADATA) {
            Some(value) => match Forwarded::parse(value.as_bytes()) {
                Ok(forwarded) => Some(forwarded),
                Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
            },
            None => None,
        };
        let Some(authenticator) = self.authenticator.clone() else {
            if let Some(forwarded) = forwarded {
                request.extensions_mut().insert(forwarded);
            }
            return Box::pin(self.inner.call(request));
        };
        if Authenticator::is_open(&path) {
            return Box::pin(self.inner.call(request));
        }
        let certificate = client_certificate(&request);
        let relayed = relayed_caller_bytes(request.headers());
        let decided = authenticator
            .authenticate(
                certificate.as_deref(),
                request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes()),
            )
            .and_then(|connection| {
                if forwarded.is_some() || relayed.is_some() {
                    authenticator.relayed_caller(self.service, &connection, relayed.as_deref())
                } else {
                    Ok(connection)
                }
            })
            .and_then(|principal| {
                authenticator
                    .authorize(&principal, &path)
                    .map(|()| principal)
            });
        match decided {
            Ok(principal) => {
                tracing::debug!(principal = %principal.id, role = %principal.role, rpc = %path,
                    forwarded_by = forwarded.as_ref().map(|f| f.by.as_str()), "call authorized");
                request.extensions_mut().insert(principal);
                if let Some(forwarded) = forwarded {
                    request.extensions_mut().insert(forwarded);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                tracing::warn!(rpc = %path, code = ?status.code(), reason = %status.message(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The relayed caller's bytes, decoded from its binary metadata (None when
/// absent; an undecodable value counts as present and empty, which the
/// check then refuses).
fn relayed_caller_bytes(headers: &http::HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(RELAYED_CALLER_METADATA)?;
    let mut only = http::HeaderMap::new();
    only.insert(RELAYED_CALLER_METADATA, value.clone());
    let metadata = tonic::metadata::MetadataMap::from_headers(only);
    Some(
        metadata
            .get_bin(RELAYED_CALLER_METADATA)
            .and_then(|v| v.to_bytes().ok())
            .map(|b| b.to_vec())
            .unwrap_or_default(),
    )
}
