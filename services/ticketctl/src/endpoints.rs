//! Where the four services are, and clients to them.

use lineguard_protos::dispatch::v1::dispatch_client::DispatchClient;
use lineguard_protos::eventlog::v1::event_log_client::EventLogClient;
use lineguard_protos::feedback::v1::feedback_client::FeedbackClient;
use lineguard_protos::intake::v1::intake_client::IntakeClient;
use lineguard_protos::routing::v1::routing_client::RoutingClient;
use lineguard_runtime::credentials::{ClientCredentials, CredentialsDir};
use tonic::transport::{Channel, Endpoint};

use crate::Error;

/// The four services, in the order their logs are read and shown.
pub const SERVICES: [&str; 4] = ["intake", "routing", "dispatch", "feedback"];

/// The gRPC addresses of the four services.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoints {
    /// Intake's gRPC address.
    #[arg(
        long,
        global = true,
        env = "LINEGUARD_INTAKE",
        default_value = "http://127.0.0.1:50051"
    )]
    pub intake: String,
    /// Routing's gRPC address.
    #[arg(
        long,
        global = true,
        env = "LINEGUARD_ROUTING",
        default_value = "http://127.0.0.1:50052"
    )]
    pub routing: String,
    /// Dispatch's gRPC address.
    #[arg(
        long,
        global = true,
        env = "LINEGUARD_DISPATCH",
        default_value = "http://127.0.0.1:50053"
    )]
    pub dispatch: String,
    /// Feedback's gRPC address.
    #[arg(
        long,
        global = true,
        env = "LINEGUARD_FEEDBACK",
        default_value = "http://127.0.0.1:50054"
    )]
    pub feedback: String,
    /// Credentials directory (see the README's "Credentials"): with it,
    /// calls go over TLS with the certificate of `--principal`.
    #[arg(long, global = true, env = "LINEGUARD_CREDENTIALS")]
    pub credentials: Option<std::path::PathBuf>,
    /// Whose certificate in `--credentials` to call with, `<role>:<id>`.
    #[arg(
        long,
        global = true,
        env = "LINEGUARD_PRINCIPAL",
        default_value = "admin:dev"
    )]
    pub principal: String,
}

impl Endpoints {
    /// The address of `service` (one of [`SERVICES`]).
    pub fn of(&self, service: &str) -> Result<&str, Error> {
        match service {
            "intake" => Ok(&self.intake),
            "routing" => Ok(&self.routing),
            "dispatch" => Ok(&self.dispatch),
            "feedback" => Ok(&self.feedback),
            other => Err(Error::Usage(format!(
                "unknown service {other}: one of intake, routing, dispatch, feedback"
            ))),
        }
    }
}

/// Lazily connected channels to the four services.
#[derive(Debug, Clone)]
pub struct Clients {
    channels: [Channel; 4],
}

fn channel(address: &str, tls: Option<&ClientCredentials>) -> Result<Channel, Error> {
    let address = match (address.split_once("://"), tls) {
        // With credentials every call is TLS, whatever scheme was written.
        (Some((_, rest)), Some(_)) => format!("https://{rest}"),
        (Some(_), None) => address.to_string(),
        (None, Some(_)) => format!("https://{address}"),
        (None, None) => format!("http://{address}"),
    };
    match tls {
        Some(credentials) => credentials
            .channel(&address)
            .map_err(|e| Error::Usage(e.to_string())),
        None => Ok(Endpoint::from_shared(address.clone())
            .map_err(|e| Error::Usage(format!("bad address {address}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy()),
    }
}

impl Clients {
    /// Channels to the four services of `endpoints`, over TLS as its
    /// principal when it names credentials.
    pub fn new(endpoints: &Endpoints) -> Result<Clients, Error> {
        let tls = match &endpoints.credentials {
            Some(dir) => {
                let (role, id) = endpoints.principal.split_once(':').ok_or_else(|| {
                    Error::Usage(format!(
                        "--principal {:?}: use <role>:<id>, e.g. admin:dev",
                        endpoints.principal
                    ))
                })?;
                Some(
                    ClientCredentials::load(&CredentialsDir::new(dir), role, id)
                        .map_err(|e| Error::Usage(e.to_string()))?,
                )
            }
            None => None,
        };
        let tls = tls.as_ref();
        Ok(Clients {
            channels: [
                channel(&endpoints.intake, tls)?,
                channel(&endpoints.routing, tls)?,
                channel(&endpoints.dispatch, tls)?,
                channel(&endpoints.feedback, tls)?,
            ],
        })
    }

    fn index(service: &str) -> Result<usize, Error> {
        SERVICES
            .iter()
            .position(|s| *s == service)
            .ok_or_else(|| Error::Usage(format!("unknown service {service}")))
    }

    /// The channel to `service` (one of [`SERVICES`]).
    pub fn channel(&self, service: &str) -> Result<Channel, Error> {
        Ok(self.channels[Self::index(service)?].clone())
    }

    /// The `EventLog` service of `service`.
    pub fn log(&self, service: &str) -> Result<EventLogClient<Channel>, Error> {
        Ok(EventLogClient::new(
            self.channels[Self::index(service)?].clone(),
        ))
    }

    pub fn intake(&self) -> IntakeClient<Channel> {
        IntakeClient::new(self.channels[0].clone())
    }

    pub fn routing(&self) -> RoutingClient<Channel> {
        RoutingClient::new(self.channels[1].clone())
    }

    pub fn dispatch(&self) -> DispatchClient<Channel> {
        DispatchClient::new(self.channels[2].clone())
    }

    pub fn feedback(&self) -> FeedbackClient<Channel> {
        FeedbackClient::new(self.channels[3].clone())
    }
}
