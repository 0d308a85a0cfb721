//! Credentials on disk: the installation's CA, each principal's
//! certificate, the token key, and the TLS set-up made from them, for
//! servers ([`ServerCredentials`]) and clients ([`ClientCredentials`]).
//!
//! A credentials directory holds:
//!
//! | file | what |
//! | --- | --- |
//! | `ca.pem` | the CA certificate every party trusts |
//! | `ca.key` | the CA's private key (only where certificates are issued) |
//! | `<name>.pem`, `<name>.key` | a principal's certificate and key; `<name>` is `<role>-<id>`, e.g. `service-routing` |
//! | `token.key` | the Ed25519 key tokens are signed with (only where tokens are issued) |
//! | `token.pub` | its public half; services accept tokens it verifies |
//! | `token-*.pub` | earlier public keys still accepted while tokens are rotated |
//!
//! [`ensure_development_set`] makes a complete set once for a machine's
//! development backend and for tests; a real installation issues its own
//! (README: "Credentials").

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::auth::{CredentialError, TokenIssuer};

/// The Lineguard services, each with a certificate `service:<name>`.
pub const SERVICES: [&str; 4] = ["intake", "routing", "dispatch", "feedback"];
/// Names every development server certificate is valid for.
pub const LOCAL_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];
/// How long development certificates are valid.
pub const DEVELOPMENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3_600);
/// Largest credential file read.
pub const MAX_CREDENTIAL_BYTES: u64 = 64 * 1024;

fn io(path: &Path, e: impl std::fmt::Display) -> CredentialError {
    CredentialError(format!("{}: {e}", path.display()))
}

/// Reads one credential file (bounded).
pub fn read(path: &Path) -> Result<Vec<u8>, CredentialError> {
    let size = std::fs::metadata(path).map_err(|e| io(path, e))?.len();
    if size > MAX_CREDENTIAL_BYTES {
        return Err(io(
            path,
            format!("{size} bytes, over the limit of {MAX_CREDENTIAL_BYTES}"),
        ));
    }
    std::fs::read(path).map_err(|e| io(path, e))
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> Result<(), CredentialError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, e))?;
    file.write_all(pem.as_bytes()).map_err(|e| io(path, e))
}

fn write_public(path: &Path, pem: &str) -> Result<(), CredentialError> {
    std::fs::write(path, pem).map_err(|e| io(path, e))
}

fn rcgen_error(what: &str, e: rcgen::Error) -> CredentialError {
    CredentialError(format!("{what}: {e}"))
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little in the past: clocks of the parties differ.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(valid_for.as_secs() as i64);
}

/// The file name of a principal's certificate (without `.pem`/`.key`).
pub fn principal_file(role: &str, id: &str) -> String {
    format!("{role}-{id}")
}

/// A credentials directory.
#[derive(Debug, Clone)]
pub struct CredentialsDir {
    /// Where it is.
    pub path: PathBuf,
}

impl CredentialsDir {
    /// The directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> CredentialsDir {
        CredentialsDir { path: path.into() }
    }

    /// `ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.path.join("ca.pem")
    }

    /// A principal's certificate and key.
    pub fn principal(&self, role: &str, id: &str) -> (PathBuf, PathBuf) {
        let name = principal_file(role, id);
        (
            self.path.join(format!("{name}.pem")),
            self.path.join(format!("{name}.key")),
        )
    }

    /// Every token public key accepted: `token.pub` and `token-*.pub`.
    pub fn token_public_keys(&self) -> Result<Vec<Vec<u8>>, CredentialError> {
        let mut keys = Vec::new();
        let entries = std::fs::read_dir(&self.path).map_err(|e| io(&self.path, e))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("token") && n.ends_with(".pub"))
            })
            .collect();
        paths.sort();
        for path in paths {
            keys.push(read(&path)?);
        }
        Ok(keys)
    }

    /// The token issuer of this directory (`token.key`).
    pub fn token_issuer(&self) -> Result<TokenIssuer, CredentialError> {
        TokenIssuer::from_pem(&read(&self.path.join("token.key"))?)
    }

    /// Issues a certificate for `role:id` signed by this directory's CA
    /// (`ca.key`), valid for `server_names` too if any (a server's).
    pub fn issue_certificate(
        &self,
        role: &str,
        id: &str,
        server_names: &[&str],
        valid_for: Duration,
    ) -> Result<(), CredentialError> {
        let ca_key_pem = String::from_utf8(read(&self.path.join("ca.key"))?)
            .map_err(|e| CredentialError(format!("ca.key: {e}")))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| rcgen_error("ca.key", e))?;
        let ca_pem = String::from_utf8(read(&self.ca())?)
            .map_err(|e| CredentialError(format!("ca.pem: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| rcgen_error("ca.pem", e))?;
        let mut params = CertificateParams::new(
            server_names
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
        )
        .map_err(|e| rcgen_error("server names", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{role}:{id}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !server_names.is_empty() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, valid_for);
        let key = KeyPair::generate().map_err(|e| rcgen_error("key", e))?;
        let certificate = params
            .signed_by(&key, &issuer)
            .map_err(|e| rcgen_error("certificate", e))?;
        let (cert_path, key_path) = self.principal(role, id);
        write_private(&key_path, &key.serialize_pem())?;
        write_public(&cert_path, &certificate.pem())
    }

    /// Makes a new CA and token key here (the directory must not hold one).
    fn create_authority(&self, valid_for: Duration) -> Result<(), CredentialError> {
        std::fs::create_dir_all(&self.path).map_err(|e| io(&self.path, e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| rcgen_error("ca", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Lineguard development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, valid_for);
        let key = KeyPair::generate().map_err(|e| rcgen_error("ca key", e))?;
        let ca = params.self_signed(&key).map_err(|e| rcgen_error("ca", e))?;
        write_private(&self.path.join("ca.key"), &key.serialize_pem())?;
        write_public(&self.ca(), &ca.pem())?;
        let token_key =
            KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| rcgen_error("token key", e))?;
        write_private(&self.path.join("token.key"), &token_key.serialize_pem())?;
        write_public(&self.path.join("token.pub"), &token_key.public_key_pem())
    }
}

/// The principals of a development set: each service (`service:<name>`,
/// also its server certificate for localhost), the NATS server
/// (`nats:local`), and the `intake_system:dev` and `admin:dev` callers.
fn development_principals() -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    let mut principals: Vec<(&str, &str, &[&str])> = SERVICES
        .iter()
        .map(|service| ("service", *service, &LOCAL_NAMES[..]))
        .collect();
    let (role, id) = crate::bus_access::NATS_SERVER_PRINCIPAL;
    principals.push((role, id, &LOCAL_NAMES[..]));
    principals.push(("intake_system", "dev", &[]));
    principals.push(("admin", "dev", &[]));
    // Prometheus, scraping the metrics endpoints (`crate::metrics`).
    principals.push(("monitor", "prometheus", &[]));
    principals
}

/// Makes, once, the development credentials in `dir`: a CA, the
/// certificates of [`development_principals`], and a token key. A directory
/// that already holds a CA keeps it; a certificate a later version added to
/// the set is issued there if the CA's key is at hand.
pub fn ensure_development_set(dir: &Path) -> Result<CredentialsDir, CredentialError> {
    let credentials = CredentialsDir::new(dir);
    if credentials.ca().exists() {
        if credentials.path.join("ca.key").exists() {
            for (role, id, names) in development_principals() {
                if !credentials.principal(role, id).0.exists() {
                    credentials.issue_certificate(role, id, names, DEVELOPMENT_VALIDITY)?;
                }
            }
        }
        return Ok(credentials);
    }
    // Made in a sibling directory and renamed into place: a half-made set
    // (the process killed midway) is never taken for a whole one.
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let staging = tempfile_dir(parent)?;
    let staged = CredentialsDir::new(staging.clone());
    staged.create_authority(DEVELOPMENT_VALIDITY)?;
    for (role, id, names) in development_principals() {
        staged.issue_certificate(role, id, names, DEVELOPMENT_VALIDITY)?;
    }
    match std::fs::rename(&staging, dir) {
        Ok(()) => Ok(credentials),
        // Another process made them first: theirs stand.
        Err(_) if credentials.ca().exists() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(credentials)
        }
        Err(e) => Err(io(dir, e)),
    }
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf, CredentialError> {
    let name = format!(
        ".credentials-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let path = parent.join(name);
    std::fs::create_dir(&path).map_err(|e| io(&path, e))?;
    Ok(path)
}

/// What a server needs: its certificate and key, and the CA its clients'
/// certificates are checked against.
#[derive(Debug, Clone)]
pub struct ServerCredentials {
    /// Certificate chain, PEM.
    pub certificate: Vec<u8>,
    /// Private key, PEM.
    pub key: Vec<u8>,
    /// The CA, PEM.
    pub ca: Vec<u8>,
}

impl ServerCredentials {
    /// The server credentials of `service` in `dir`.
    pub fn load(dir: &CredentialsDir, service: &str) -> Result<ServerCredentials, CredentialError> {
        let (cert, key) = dir.principal("service", service);
        Ok(ServerCredentials {
            certificate: read(&cert)?,
            key: read(&key)?,
            ca: read(&dir.ca())?,
        })
    }

    /// tonic's TLS configuration: the server's identity; client
    /// certificates checked against the CA when presented (a caller with a
    /// token presents none).
    pub fn tls(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.certificate,
                &self.key,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
    }
}

/// What a client needs: the CA to check servers against, and its own
/// certificate and key or a token.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    /// The CA, PEM.
    pub ca: Vec<u8>,
    /// Certificate and key, PEM (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientCredentials {
    /// The client certificate of `role:id` in `dir`.
    pub fn load(
        dir: &CredentialsDir,
        role: &str,
        id: &str,
    ) -> Result<ClientCredentials, CredentialError> {
        let (cert, key) = dir.principal(role, id);
        Ok(ClientCredentials {
            ca: read(&dir.ca())?,
            identity: Some((read(&cert)?, read(&key)?)),
        })
    }

    /// Only the CA: a caller that authenticates with a token.
    pub fn ca_only(dir: &CredentialsDir) -> Result<ClientCredentials, CredentialError> {
        Ok(ClientCredentials {
            ca: read(&dir.ca())?,
            identity: None,
        })
    }

    /// tonic's TLS configuration for a server named `domain`.
    pub fn tls(&self, domain: &str) -> tonic::transport::ClientTlsConfig {
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .domain_name(domain);
        match &self.identity {
            Some((cert, key)) => config.identity(tonic::transport::Identity::from_pem(cert, key)),
            None => config,
        }
    }

    /// A lazily connecting channel to `url` (`https://host:port`).
    pub fn channel(&self, url: &str) -> Result<tonic::transport::Channel, CredentialError> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| CredentialError(format!("{url}: {e}")))?;
        let host = endpoint.uri().host().unwrap_or("localhost").to_string();
        Ok(endpoint
            .tls_config(self.tls(&host))
            .map_err(|e| CredentialError(format!("{url}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy())
    }
}
