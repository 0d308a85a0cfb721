//! Intake split into partitions: which partition a report belongs to, and
//! `ListTickets` gathered from all of them.
//!
//! A report belongs to the partition that owns its district's station
//! (`lineguard_runtime::partitions`): the district comes from the caller
//! or the account (intake's copy of the directory), its station from
//! routing (`LookupOwner`, asked of this partition's routing and kept in a
//! bounded cache, since a district changes station only when the directory
//! file is changed). A report of no known district belongs to partition 0.
//! An unsplit intake asks nothing.
//!
//! A company-level `ListTickets` asks every partition for a page and
//! merges them by report time ([`listing_key`];
//! `lineguard_runtime::partitions::Partitions::gather`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lineguard_protos::intake::v1::TicketView;
use lineguard_protos::routing::v1::LookupOwnerRequest;
use lineguard_protos::routing::v1::routing_client::RoutingClient;
use tonic::Status;
use tonic::transport::Channel;

use crate::projection::{by_time_key, nanos};

/// Districts whose station is remembered at most; past it the cache is
/// emptied (a province has about 5,000 districts).
pub const MAX_CACHED_DISTRICTS: usize = 65_536;
/// How long a district's station is believed before routing is asked again.
pub const STATION_CACHE_TTL: Duration = Duration::from_secs(600);
/// How long routing is given to say which station owns a district.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(3);

/// The station of each district, as this partition's routing says.
pub struct StationOfDistrict {
    routing: Option<Channel>,
    cache: Mutex<HashMap<String, (String, Instant)>>,
}

impl StationOfDistrict {
    /// Asking routing over `routing` (`None`: no routing peer configured,
    /// so every district's station is unknown and its reports stay here).
    pub fn new(routing: Option<Channel>) -> StationOfDistrict {
        StationOfDistrict {
            routing,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The station owning `district_id`; empty when the directory has no
    /// such district. `UNAVAILABLE` when routing cannot be asked: the
    /// caller retries (the report is not taken in the wrong partition).
    pub async fn station(&self, district_id: &str) -> Result<String, Status> {
        if let Some((station, at)) = self.cache().get(district_id)
            && at.elapsed() < STATION_CACHE_TTL
        {
            return Ok(station.clone());
        }
        let Some(routing) = &self.routing else {
            return Err(Status::unavailable(
                "intake has no --peer routing=URL to ask which station owns the district",
            ));
        };
        let mut request = tonic::Request::new(LookupOwnerRequest {
            account_number: String::new(),
            district_id: district_id.to_string(),
        });
        request.set_timeout(LOOKUP_DEADLINE);
        let station = match RoutingClient::new(routing.clone())
            .lookup_owner(request)
            .await
        {
            Ok(answer) => answer
                .into_inner()
                .district
                .map(|d| d.station_id)
                .unwrap_or_default(),
            Err(status) if status.code() == tonic::Code::NotFound => String::new(),
            Err(status) => {
                return Err(Status::unavailable(format!(
                    "cannot tell which partition owns district {district_id}: routing: {}",
                    status.message()
                )));
            }
        };
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED_DISTRICTS {
            cache.clear();
        }
        cache.insert(district_id.to_string(), (station.clone(), Instant::now()));
        Ok(station)
    }
}

/// The listing key of a ticket as a partition's index holds it.
pub fn listing_key(ticket: &TicketView) -> String {
    let reported = ticket.reported_at.as_ref().map_or(0, nanos);
    String::from_utf8_lossy(&by_time_key(reported, &ticket.ticket_id)).into_owned()
}
