//! Every call authenticated, then held to its role: a real tonic server over
//! TLS with the [`AuthLayer`], called with client certificates, tokens,
//! nothing, and credentials that must not work.

use std::sync::Arc;
use std::time::Duration;

use lineguard_eventlog::{EventLog, EventLogService, LogConfig};
use lineguard_protos::eventlog::v1::event_log_client::EventLogClient;
use lineguard_protos::eventlog::v1::{GetLogInfoRequest, RebuildProjectionsRequest};
use lineguard_runtime::access::{AccessPolicy, rpcs_of};
use lineguard_runtime::auth::{
    AuthLayer, Authenticator, Credential, FORWARDED_BY_METADATA, Principal,
    RELAYED_CALLER_METADATA, TOKEN_ISSUER, TokenClaims,
};
use lineguard_runtime::credentials::{
    ClientCredentials, CredentialsDir, ServerCredentials, ensure_development_set,
};
use tonic::Code;
use tonic::transport::Channel;

fn policy() -> Arc<AccessPolicy> {
    let rpcs = rpcs_of(&[lineguard_protos::FILE_DESCRIPTOR_SET]).expect("rpcs");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/access.toml");
    Arc::new(AccessPolicy::load(&path, &rpcs).expect("policy"))
}

struct Served {
    _dir: tempfile::TempDir,
    credentials: CredentialsDir,
    url: String,
    _log: EventLog,
}

async fn serve() -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials = ensure_development_set(&dir.path().join("credentials")).expect("credentials");
    let log = EventLog::open(LogConfig::new(dir.path().join("log"), "intake")).expect("log");
    let server = ServerCredentials::load(&credentials, "intake").expect("server credentials");
    let authenticator = Authenticator::new(
        policy(),
        &credentials.token_public_keys().expect("token keys"),
    )
    .expect("authenticator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_, health) = tonic_health::server::health_reporter();
    let router = tonic::transport::Server::builder()
        .tls_config(server.tls())
        .expect("tls")
        .layer(AuthLayer::new(Arc::new(authenticator), "intake"))
        .add_service(health)
        .add_service(EventLogService::server(log.clone()));
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Served {
        _dir: dir,
        credentials,
        url: format!("https://127.0.0.1:{}", addr.port()),
        _log: log,
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

fn channel(served: &Served, credentials: ClientCredentials) -> Channel {
    credentials.channel(&served.url).expect("channel")
}

fn as_certificate(served: &Served, role: &str, id: &str) -> EventLogClient<Channel> {
    EventLogClient::new(channel(
        served,
        ClientCredentials::load(&served.credentials, role, id).expect("client credentials"),
    ))
}

fn anonymous(served: &Served) -> EventLogClient<Channel> {
    EventLogClient::new(channel(
        served,
        ClientCredentials::ca_only(&served.credentials).expect("ca"),
    ))
}

#[tokio::test]
async fn a_client_certificate_names_the_caller_and_its_role_decides() {
    let served = serve().await;
    let mut admin = as_certificate(&served, "admin", "dev");
    let info = admin
        .get_log_info(GetLogInfoRequest {})
        .await
        .expect("an admin reads the log's info")
        .into_inner();
    assert_eq!(info.service, "intake");
    admin
        .rebuild_projections(RebuildProjectionsRequest {})
        .await
        .expect("an admin rebuilds");

    let mut system = as_certificate(&served, "intake_system", "dev");
    let denied = system
        .rebuild_projections(RebuildProjectionsRequest {})
        .await
        .expect_err("an intake system may not rebuild");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("intake_system")
            && denied
                .message()
                .contains("lineguard.eventlog.v1.EventLog/RebuildProjections"),
        "names the role and the RPC: {}",
        denied.message()
    );

    let mut peer = as_certificate(&served, "service", "routing");
    peer.get_log_info(GetLogInfoRequest {})
        .await
        .expect("a peer service reads the log's head");
}

#[tokio::test]
async fn no_credentials_is_unauthenticated_but_health_stays_open() {
    let served = serve().await;
    let status = anonymous(&served)
        .get_log_info(GetLogInfoRequest {})
        .await
        .expect_err("nobody");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("no credentials"), "{status:?}");

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(
        &served,
        ClientCredentials::ca_only(&served.credentials).expect("ca"),
    ));
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers anyone");
}

#[tokio::test]
async fn tokens_name_operators_and_phones_and_bad_ones_are_refused_with_the_reason() {
    let served = serve().await;
    let issuer = served.credentials.token_issuer().expect("issuer");
    let day = Duration::from_secs(24 * 3_600);
    let operator = issuer
        .issue("ops-wang", "operator", "", "", day)
        .expect("token");
    let mut client = anonymous(&served);
    client
        .get_log_info(with_token(GetLogInfoRequest {}, &operator))
        .await
        .expect("an operator reads");
    let denied = client
        .rebuild_projections(with_token(RebuildProjectionsRequest {}, &operator))
        .await
        .expect_err("an operator may not rebuild");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("operator"), "{denied:?}");

    // Refused, each with its reason.
    let refused = |token: String| {
        let mut client = client.clone();
        async move {
            client
                .get_log_info(with_token(GetLogInfoRequest {}, &token))
                .await
                .expect_err("refused")
        }
    };
    let key = std::fs::read(served.credentials.path.join("token.key")).expect("key");
    let signing = jsonwebtoken::EncodingKey::from_ed_pem(&key).expect("signing key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("now")
        .as_secs();
    let claims = |iat: u64, exp: u64, role: &str| TokenClaims {
        sub: "someone".into(),
        role: role.into(),
        crew: String::new(),
        device: String::new(),
        iss: TOKEN_ISSUER.into(),
        aud: TOKEN_ISSUER.into(),
        iat,
        exp,
    };
    let sign = |claims: &TokenClaims| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            claims,
            &signing,
        )
        .expect("sign")
    };
    let expired = refused(sign(&claims(now - 7_200, now - 3_600, "operator"))).await;
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(expired.message().contains("expired"), "{expired:?}");

    let other = tempfile::tempdir().expect("tempdir");
    let foreign = ensure_development_set(&other.path().join("c"))
        .expect("another installation")
        .token_issuer()
        .expect("issuer")
        .issue("ops-wang", "operator", "", "", day)
        .expect("token");
    let forged = refused(foreign).await;
    assert_eq!(forged.code(), Code::Unauthenticated);
    assert!(forged.message().contains("signature"), "{forged:?}");

    let unknown_role = refused(sign(&claims(now, now + 60, "superuser"))).await;
    assert_eq!(unknown_role.code(), Code::Unauthenticated);
    assert!(
        unknown_role.message().contains("superuser"),
        "{unknown_role:?}"
    );

    let crewless = refused(sign(&claims(now, now + 60, "crew"))).await;
    assert_eq!(crewless.code(), Code::Unauthenticated);
    assert!(crewless.message().contains("crew"), "{crewless:?}");

    let forever = refused(sign(&claims(now, now + 400 * 24 * 3_600, "operator"))).await;
    assert_eq!(forever.code(), Code::Unauthenticated);
    assert!(forever.message().contains("limit"), "{forever:?}");

    let garbage = refused("not-a-token".into()).await;
    assert_eq!(garbage.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_certificate_from_another_ca_gets_no_connection() {
    let served = serve().await;
    let other = tempfile::tempdir().expect("tempdir");
    let foreign_dir = ensure_development_set(&other.path().join("c")).expect("another CA");
    // Trusts the right server, presents a certificate of another CA.
    let mut foreign = ClientCredentials::load(&foreign_dir, "admin", "dev").expect("foreign");
    foreign.ca = std::fs::read(served.credentials.ca()).expect("ca");
    let refused = EventLogClient::new(channel(&served, foreign))
        .get_log_info(GetLogInfoRequest {})
        .await
        .expect_err("the TLS handshake refuses it");
    assert_ne!(refused.code(), Code::Ok);
}

/// A request carrying `relayed` as the caller a partition forwards.
fn forwarded<T>(message: T, relayed: Option<&Principal>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        FORWARDED_BY_METADATA,
        "intake-p1/2".parse().expect("header"),
    );
    if let Some(relayed) = relayed {
        request.metadata_mut().insert_bin(
            RELAYED_CALLER_METADATA,
            tonic::metadata::MetadataValue::from_bytes(&relayed.relayed()),
        );
    }
    request
}

fn principal(role: &str, id: &str) -> Principal {
    Principal {
        id: id.into(),
        role: role.into(),
        crew_id: String::new(),
        device_id: String::new(),
        credential: Credential::Certificate,
    }
}

/// Another instance of the same service may forward a call with its caller
/// relayed; the call is then held to the relayed caller's role. Nobody
/// else may ask to be taken for somebody else, and a forwarded call must
/// say whose it is.
#[tokio::test]
async fn only_the_same_service_relays_a_caller_and_the_caller_is_held_to_its_role() {
    let served = serve().await;
    let admin = principal("admin", "dev");
    let system = principal("intake_system", "callcentre");

    let mut own_instance = as_certificate(&served, "service", "intake");
    own_instance
        .rebuild_projections(forwarded(RebuildProjectionsRequest {}, Some(&admin)))
        .await
        .expect("another intake instance relays an administrator");
    let denied = own_instance
        .rebuild_projections(forwarded(RebuildProjectionsRequest {}, Some(&system)))
        .await
        .expect_err("the relayed caller's role decides");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("intake_system"), "{denied:?}");
    let anonymous = own_instance
        .get_log_info(forwarded(GetLogInfoRequest {}, None))
        .await
        .expect_err("a forwarded call says whose it is");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    // Another service's certificate may not relay anybody.
    let mut routing = as_certificate(&served, "service", "routing");
    let refused = routing
        .get_log_info(forwarded(GetLogInfoRequest {}, Some(&admin)))
        .await
        .expect_err("routing may not forward intake's calls");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("forward"), "{refused:?}");

    // Nor may a token holder, with or without a relayed caller.
    let token = served
        .credentials
        .token_issuer()
        .expect("issuer")
        .issue("ops-wang", "operator", "", "", Duration::from_secs(3_600))
        .expect("token");
    let mut as_operator = EventLogClient::new(channel(
        &served,
        ClientCredentials::ca_only(&served.credentials).expect("ca"),
    ));
    let mut request = forwarded(GetLogInfoRequest {}, Some(&admin));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let refused = as_operator
        .get_log_info(request)
        .await
        .expect_err("an operator may not pass itself off as an administrator");
    assert_eq!(refused.code(), Code::PermissionDenied);
}
