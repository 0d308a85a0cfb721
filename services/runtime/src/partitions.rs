//! Any instance answers any call: a call about work another partition of
//! the same service owns is forwarded there, once, with its caller.
//!
//! A service split into P partitions ([`lineguard_bus::partition`]) keeps
//! each case in the partition that opened it (its id says which:
//! [`Partition::of_case`]) and each station's new work in the partition
//! its id hashes to ([`Partition::owning`]). A caller knows none of this:
//! whichever instance it reaches asks [`Partitions::route`] where the call
//! belongs and, when elsewhere, sends it there with [`Partitions::relay`]
//! (over the channel `--peer <service>-p<k>=URL` names) and returns the
//! answer as its own. Company-level reads ask every partition
//! ([`Partitions::all`]) and gather.
//!
//! Two rules keep forwarding safe:
//! - **once**: a forwarded call carries `x-lineguard-forwarded-by`; it is
//!   answered where it lands, never forwarded again, so two instances that
//!   disagree (a directory change not yet seen by both) cannot bounce a
//!   call between them; instances that count partitions differently
//!   refuse each other's calls (`FAILED_PRECONDITION`), since they would
//!   disagree on every owner;
//! - **as the caller**: the forwarding instance calls as
//!   `service:<service>` and relays the authenticated caller in
//!   `x-lineguard-relayed-caller-bin`; the receiving server takes the
//!   relayed caller only from its own service's certificate
//!   ([`crate::auth`]) and holds it to the access policy again, so a
//!   forwarded call can do exactly what the caller could do directly.

use std::future::Future;
use std::sync::Arc;

use lineguard_bus::Partition;
use tonic::Status;
use tonic::transport::Channel;

use crate::auth::{FORWARDED_BY_METADATA, Forwarded, Principal, RELAYED_CALLER_METADATA};

/// The partitions of one service, as one of its instances sees them.
#[derive(Clone, Debug)]
pub struct Partitions {
    service: &'static str,
    own: Partition,
    /// A channel to each partition's instance, by index; `None` for this
    /// instance and for a partition no `--peer` names.
    channels: Arc<Vec<Option<Channel>>>,
}

impl Partitions {
    /// An unsplit service: everything is answered here.
    pub fn sole(service: &'static str) -> Partitions {
        Partitions {
            service,
            own: Partition::SOLE,
            channels: Arc::new(vec![None]),
        }
    }

    /// Partition `own` of `service`, reaching partition k over
    /// `channel_to(k)` (this instance's own index is never asked for).
    pub fn new(
        service: &'static str,
        own: Partition,
        mut channel_to: impl FnMut(Partition) -> Option<Channel>,
    ) -> Partitions {
        let channels = Partition::all(own.count())
            .map(|p| if p == own { None } else { channel_to(p) })
            .collect();
        Partitions {
            service,
            own,
            channels: Arc::new(channels),
        }
    }

    /// This instance's partition.
    pub fn own(&self) -> Partition {
        self.own
    }

    /// How many partitions the service is split into.
    pub fn count(&self) -> u16 {
        self.own.count()
    }

    /// The partition that takes a station's new work: the hash of its id
    /// ([`Partition::owning`]); partition 0 for work of no known station
    /// (a call whose district nobody knows goes to the company's desk,
    /// which every partition has).
    pub fn owner_of_station(&self, station_id: &str) -> Partition {
        if station_id.is_empty() {
            Partition::all(self.count())
                .next()
                .unwrap_or(Partition::SOLE)
        } else {
            Partition::owning(station_id, self.count())
        }
    }

    /// The partition that answers for case `id` (a ticket, an incident or
    /// an order, named by its case): the one that opened it.
    pub fn owner_of_case(&self, field: &str, id: &str) -> Result<Partition, Status> {
        Partition::of_case(id, self.count()).ok_or_else(|| {
            Status::not_found(format!(
                "{field}: {id} names a partition this installation of {} partitions does not have",
                self.count()
            ))
        })
    }

    /// Where a call about case `id` is answered: `None` here (an unsplit
    /// service, no case named, or this partition opened it), else the
    /// channel to the partition that opened it.
    pub fn route_case<T>(
        &self,
        request: &tonic::Request<T>,
        field: &str,
        id: &str,
    ) -> Result<Option<Channel>, Status> {
        if self.count() == 1 || id.is_empty() {
            return Ok(None);
        }
        let owner = self.owner_of_case(field, id)?;
        self.route(request, owner)
    }

    /// Where a call about `owner`'s work is answered: `None` here (this
    /// instance owns it, or another partition already forwarded it here),
    /// else the channel to send it on with [`Partitions::relay`].
    pub fn route<T>(
        &self,
        request: &tonic::Request<T>,
        owner: Partition,
    ) -> Result<Option<Channel>, Status> {
        if let Some(forwarded) = request.extensions().get::<Forwarded>() {
            if forwarded.partitions != self.count() {
                return Err(Status::failed_precondition(format!(
                    "{} forwarded this call counting {} partitions; {} counts {}: \
                     every instance of an installation must run with the same --partitions",
                    forwarded.by,
                    forwarded.partitions,
                    self.own.bus_name(self.service),
                    self.count()
                )));
            }
            return Ok(None);
        }
        if owner == self.own {
            return Ok(None);
        }
        self.channel(owner).map(Some)
    }

    /// The channel to partition `to`'s instance.
    pub fn channel(&self, to: Partition) -> Result<Channel, Status> {
        self.channels
            .get(usize::from(to.index()))
            .cloned()
            .flatten()
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "partition {} of {} owns this, and this instance has no --peer {}=URL to reach it",
                    to.index(),
                    self.count(),
                    to.bus_name(self.service)
                ))
            })
    }

    /// `request` as it is sent on to another partition: the same message,
    /// its deadline, marked as forwarded by this instance, with its
    /// authenticated caller relayed.
    pub fn relay<T>(&self, request: tonic::Request<T>) -> Result<tonic::Request<T>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        let timeout = request.metadata().get("grpc-timeout").cloned();
        let mut relayed = tonic::Request::new(request.into_inner());
        let metadata = relayed.metadata_mut();
        if let Some(timeout) = timeout {
            metadata.insert("grpc-timeout", timeout);
        }
        let by = Forwarded::header_value(&self.own.bus_name(self.service), self.count());
        metadata.insert(
            FORWARDED_BY_METADATA,
            by.parse()
                .map_err(|_| Status::internal("forwarded-by metadata does not encode"))?,
        );
        if let Some(caller) = caller {
            metadata.insert_bin(
                RELAYED_CALLER_METADATA,
                tonic::metadata::MetadataValue::from_bytes(&caller.relayed()),
            );
        }
        // The owner's work joins this call's trace.
        crate::traces::inject(metadata);
        Ok(relayed)
    }

    /// Whether `request` was forwarded here by another partition (a
    /// company-level read then answers for this partition alone).
    pub fn was_forwarded<T>(request: &tonic::Request<T>) -> bool {
        request.extensions().get::<Forwarded>().is_some()
    }

    /// Marks `request` as forwarded by this instance, for a gather's own
    /// share answered in-process: it is then answered here alone.
    pub fn mark_forwarded<T>(&self, request: &mut tonic::Request<T>) {
        request.extensions_mut().insert(Forwarded {
            by: self.own.bus_name(self.service),
            partitions: self.count(),
        });
    }

    /// For a change every partition makes (the directory): a copy of
    /// `request` for each other partition, with the channel to send it on.
    /// None when the service is unsplit or the call was itself forwarded
    /// (the instance the caller reached sends the copies).
    pub fn copies_for_the_others<T: Clone>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<Vec<(Partition, Channel, tonic::Request<T>)>, Status> {
        if self.count() == 1 || Self::was_forwarded(request) {
            return Ok(Vec::new());
        }
        let mut copies = Vec::with_capacity(usize::from(self.count()) - 1);
        for (partition, channel) in self.all()? {
            if let Some(channel) = channel {
                copies.push((partition, channel, self.relay_copy(request)?));
            }
        }
        Ok(copies)
    }

    /// `request` without its message (a stream cannot be copied): its
    /// metadata, caller and forwarding mark, for
    /// [`Partitions::copies_for_the_others`] of a streaming call, each copy
    /// then given its own stream (`Request::from_parts`).
    pub fn without_message<T>(request: &tonic::Request<T>) -> tonic::Request<()> {
        let mut probe = tonic::Request::new(());
        *probe.metadata_mut() = request.metadata().clone();
        if let Some(caller) = request.extensions().get::<Principal>() {
            probe.extensions_mut().insert(caller.clone());
        }
        if let Some(forwarded) = request.extensions().get::<Forwarded>() {
            probe.extensions_mut().insert(forwarded.clone());
        }
        probe
    }

    /// `status` from partition `partition`, saying so.
    pub fn from_partition(partition: Partition, status: Status) -> Status {
        Status::new(
            status.code(),
            format!("partition {}: {}", partition.index(), status.message()),
        )
    }

    /// Every partition, with the channel to reach it (`None`: this one).
    pub fn all(&self) -> Result<Vec<(Partition, Option<Channel>)>, Status> {
        Partition::all(self.count())
            .map(|p| {
                if p == self.own {
                    Ok((p, None))
                } else {
                    self.channel(p).map(|c| (p, Some(c)))
                }
            })
            .collect()
    }

    /// A copy of `request` for one partition of a gather: the message
    /// cloned, relayed as [`Partitions::relay`] does.
    pub fn relay_copy<T: Clone>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<tonic::Request<T>, Status> {
        let mut copy = tonic::Request::new(request.get_ref().clone());
        // What `relay` carries over: the deadline and the caller.
        if let Some(timeout) = request.metadata().get("grpc-timeout") {
            copy.metadata_mut().insert("grpc-timeout", timeout.clone());
        }
        if let Some(caller) = request.extensions().get::<Principal>() {
            copy.extensions_mut().insert(caller.clone());
        }
        self.relay(copy)
    }
}

/// A listing's request: where its page starts and how long it is.
pub trait PagedRequest {
    /// Asks for `page_size` items from `page_token` on.
    fn set_page(&mut self, page_token: String, page_size: u32);
}

impl PagedRequest for lineguard_protos::intake::v1::ListTicketsRequest {
    fn set_page(&mut self, page_token: String, page_size: u32) {
        self.page_token = page_token;
        self.page_size = page_size;
    }
}

impl PagedRequest for lineguard_protos::feedback::v1::ListDueFollowUpsRequest {
    fn set_page(&mut self, page_token: String, page_size: u32) {
        self.page_token = page_token;
        self.page_size = page_size;
    }
}

/// One page of a listing: its items, in the listing's key order, and the
/// token of the next page (empty on the last).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<I> {
    /// The page's items.
    pub items: Vec<I>,
    /// Where the next page starts; empty when there is none.
    pub next_page_token: String,
}

/// Where a gathered listing stands in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionCursor {
    /// Not read yet: from its first item.
    Start,
    /// After this listing key (the partition's own page token).
    After(String),
    /// Every item of it was listed.
    Done,
}

/// The page token of a listing gathered from every partition: one cursor
/// per partition, written `gather:` then each partition's (`-` start,
/// `~` done, else its own page token), `|`-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatherToken(pub Vec<PartitionCursor>);

/// Marks a gathered token.
const GATHER_PREFIX: &str = "gather:";
/// Longest gathered token read: 64 partitions of a 160-byte key.
pub const MAX_GATHER_TOKEN_BYTES: usize = 64 * 160;

impl GatherToken {
    /// A first page over `partitions` partitions.
    pub fn start(partitions: usize) -> GatherToken {
        GatherToken(vec![PartitionCursor::Start; partitions])
    }

    /// The token as given to the caller; empty when every partition is done.
    pub fn encode(&self) -> String {
        if self.0.iter().all(|c| *c == PartitionCursor::Done) {
            return String::new();
        }
        let parts: Vec<&str> = self
            .0
            .iter()
            .map(|c| match c {
                PartitionCursor::Start => "-",
                PartitionCursor::Done => "~",
                PartitionCursor::After(key) => key.as_str(),
            })
            .collect();
        format!("{GATHER_PREFIX}{}", parts.join("|"))
    }

    /// A token issued over `partitions` partitions whose cursors each pass
    /// `is_cursor` (a page token the partition itself would give).
    pub fn decode(
        token: &str,
        partitions: usize,
        is_cursor: impl Fn(&str) -> bool,
    ) -> Result<GatherToken, String> {
        if token.len() > MAX_GATHER_TOKEN_BYTES {
            return Err(format!("over {MAX_GATHER_TOKEN_BYTES} bytes"));
        }
        let body = token
            .strip_prefix(GATHER_PREFIX)
            .ok_or("not a token this service issued")?;
        let cursors: Vec<PartitionCursor> = body
            .split('|')
            .map(|part| match part {
                "-" => Ok(PartitionCursor::Start),
                "~" => Ok(PartitionCursor::Done),
                key if !key.contains('|') && is_cursor(key) => {
                    Ok(PartitionCursor::After(key.to_string()))
                }
                _ => Err("not a token this service issued".to_string()),
            })
            .collect::<Result<_, _>>()?;
        if cursors.len() != partitions {
            return Err(format!(
                "issued over {} partitions; this installation has {partitions}",
                cursors.len()
            ));
        }
        Ok(GatherToken(cursors))
    }
}

/// Merges one page from each partition (`pages[i]` read from `token.0[i]`,
/// `None` for a partition already done) into the first `page_size` items
/// by `key_of` (each partition's listing key: its pages are in that order),
/// and the token resuming each partition after the last of its items taken.
pub fn merge_pages<I>(
    token: &GatherToken,
    pages: Vec<Option<Page<I>>>,
    page_size: usize,
    key_of: impl Fn(&I) -> String,
) -> Page<I> {
    debug_assert_eq!(token.0.len(), pages.len());
    let mut candidates: Vec<(String, usize, I)> = Vec::new();
    let mut next_tokens = Vec::with_capacity(pages.len());
    for (partition, page) in pages.into_iter().enumerate() {
        match page {
            Some(page) => {
                next_tokens.push(Some(page.next_page_token));
                candidates.extend(page.items.into_iter().map(|i| (key_of(&i), partition, i)));
            }
            None => next_tokens.push(None),
        }
    }
    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    let mut offered = vec![0usize; next_tokens.len()];
    for (_, partition, _) in &candidates {
        offered[*partition] += 1;
    }
    let mut taken = vec![0usize; next_tokens.len()];
    let mut next = token.clone();
    let mut items = Vec::with_capacity(page_size.min(candidates.len()));
    for (key, partition, item) in candidates.into_iter().take(page_size) {
        taken[partition] += 1;
        next.0[partition] = PartitionCursor::After(key);
        items.push(item);
    }
    for (partition, next_token) in next_tokens.into_iter().enumerate() {
        let Some(next_token) = next_token else {
            continue;
        };
        if taken[partition] == offered[partition] {
            // All it offered was taken: resume where it said, or it is done.
            next.0[partition] = if next_token.is_empty() {
                PartitionCursor::Done
            } else {
                PartitionCursor::After(next_token)
            };
        }
    }
    Page {
        items,
        next_page_token: next.encode(),
    }
}

impl Partitions {
    /// A company-level listing: a page of `page_size` from every partition
    /// (asked at once, each from its cursor in `page_token`), merged by
    /// `key_of`. `ask(channel, request)` reads one partition's page (the
    /// request set to its cursor and the page size): over `channel`, or
    /// here when it is `None` (the request is then marked forwarded, so the
    /// service answers for this partition alone).
    pub async fn gather<Req, I, Fut>(
        &self,
        request: &tonic::Request<Req>,
        page_token: &str,
        page_size: usize,
        is_cursor: impl Fn(&str) -> bool,
        key_of: impl Fn(&I) -> String,
        ask: impl Fn(Option<Channel>, tonic::Request<Req>) -> Fut,
    ) -> Result<Page<I>, Status>
    where
        Req: Clone + PagedRequest,
        Fut: Future<Output = Result<Page<I>, Status>>,
    {
        let partitions = self.all()?;
        let token = if page_token.is_empty() {
            GatherToken::start(partitions.len())
        } else {
            GatherToken::decode(page_token, partitions.len(), is_cursor)
                .map_err(|why| Status::invalid_argument(format!("invalid page_token: {why}")))?
        };
        let mut asks = Vec::with_capacity(partitions.len());
        for ((partition, channel), cursor) in partitions.into_iter().zip(&token.0) {
            let from = match cursor {
                PartitionCursor::Done => continue,
                PartitionCursor::Start => String::new(),
                PartitionCursor::After(key) => key.clone(),
            };
            let mut one = self.relay_copy(request)?;
            one.get_mut()
                .set_page(from, u32::try_from(page_size).unwrap_or(u32::MAX));
            if channel.is_none() {
                self.mark_forwarded(&mut one);
            }
            let page = ask(channel, one);
            asks.push(async move {
                page.await
                    .map(|page| (usize::from(partition.index()), page))
                    .map_err(|status| Self::from_partition(partition, status))
            });
        }
        let mut pages: Vec<Option<Page<I>>> = (0..token.0.len()).map(|_| None).collect();
        for (index, page) in futures::future::try_join_all(asks).await? {
            pages[index] = Some(page);
        }
        Ok(merge_pages(&token, pages, page_size, key_of))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy(port: u16) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("endpoint")
            .connect_lazy()
    }

    #[tokio::test]
    async fn a_call_is_answered_by_its_owner_and_never_forwarded_twice() {
        let own = Partition::new(0, 2).expect("0 of 2");
        let other = Partition::new(1, 2).expect("1 of 2");
        let partitions = Partitions::new("intake", own, |_| Some(lazy(1)));
        let request = tonic::Request::new(());
        assert!(partitions.route(&request, own).expect("own").is_none());
        assert!(partitions.route(&request, other).expect("other").is_some());

        let mut caller_request = tonic::Request::new(());
        caller_request.extensions_mut().insert(Principal {
            id: "dev".into(),
            role: "desk".into(),
            crew_id: String::new(),
            device_id: String::new(),
            credential: crate::auth::Credential::Token,
        });
        let relayed = partitions.relay(caller_request).expect("relay");
        assert_eq!(
            relayed
                .metadata()
                .get(FORWARDED_BY_METADATA)
                .expect("marked"),
            "intake/2"
        );
        let caller = relayed
            .metadata()
            .get_bin(RELAYED_CALLER_METADATA)
            .expect("caller relayed")
            .to_bytes()
            .expect("bytes");
        assert_eq!(&caller[..], b"desk\0dev\0\0\0token");

        // Arrived forwarded: answered here whoever owns it.
        let mut arrived = tonic::Request::new(());
        arrived.extensions_mut().insert(Forwarded {
            by: "intake".into(),
            partitions: 2,
        });
        let at_other = Partitions::new("intake", other, |_| Some(lazy(1)));
        assert!(at_other.route(&arrived, own).expect("answered").is_none());
        // From an instance counting otherwise: refused.
        let counting_three =
            Partitions::new("intake", Partition::new(1, 3).expect("1 of 3"), |_| None);
        let refused = counting_three.route(&arrived, own).expect_err("disagree");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn an_unreachable_owner_is_unavailable_and_named() {
        let partitions =
            Partitions::new("routing", Partition::new(0, 2).expect("0 of 2"), |_| None);
        let missing = partitions
            .channel(Partition::new(1, 2).expect("1 of 2"))
            .expect_err("no peer");
        assert_eq!(missing.code(), tonic::Code::Unavailable);
        assert!(missing.message().contains("routing-p1"), "{missing:?}");
        let sole = Partitions::sole("routing");
        assert_eq!(sole.owner_of_station("s-1"), Partition::SOLE);
        assert_eq!(sole.all().expect("all").len(), 1);
        let bad = partitions
            .owner_of_case("ticket_id", "ticket-p7-x")
            .expect_err("no partition 7");
        assert_eq!(bad.code(), tonic::Code::NotFound);
    }

    fn page(keys: &[&str], more: bool) -> Option<Page<String>> {
        Some(Page {
            items: keys.iter().map(|k| (*k).to_string()).collect(),
            next_page_token: if more {
                keys.last().map(|k| (*k).to_string()).unwrap_or_default()
            } else {
                String::new()
            },
        })
    }

    #[test]
    fn pages_merge_by_key_and_each_partition_resumes_after_its_last_taken() {
        let key = |k: &String| k.clone();
        let merged = merge_pages(
            &GatherToken::start(2),
            vec![page(&["k1", "k3"], true), page(&["k2", "k4"], false)],
            3,
            key,
        );
        assert_eq!(merged.items, ["k1", "k2", "k3"]);
        let token =
            GatherToken::decode(&merged.next_page_token, 2, |k| k.starts_with('k')).expect("ours");
        // Partition 0 gave all it offered: it resumes where it said.
        assert_eq!(token.0[0], PartitionCursor::After("k3".into()));
        // Partition 1's k4 was not taken: it resumes after k2.
        assert_eq!(token.0[1], PartitionCursor::After("k2".into()));
        let last = merge_pages(&token, vec![page(&[], false), page(&["k4"], false)], 3, key);
        assert_eq!(last.items, ["k4"]);
        assert!(last.next_page_token.is_empty(), "every partition is done");
        // A partition already done is not asked again.
        let done = GatherToken(vec![PartitionCursor::Done, PartitionCursor::Start]);
        let rest = merge_pages(&done, vec![None, page(&["k5"], false)], 3, key);
        assert_eq!(rest.items, ["k5"]);
        assert!(rest.next_page_token.is_empty());
    }

    #[test]
    fn a_gathered_token_is_only_one_issued_for_this_many_partitions() {
        let token = GatherToken(vec![
            PartitionCursor::Start,
            PartitionCursor::Done,
            PartitionCursor::After("by-time/1/ticket-a".into()),
        ]);
        let encoded = token.encode();
        let ours = |k: &str| k.starts_with("by-time/");
        assert_eq!(GatherToken::decode(&encoded, 3, ours), Ok(token));
        assert!(GatherToken::decode(&encoded, 2, ours).is_err());
        assert!(GatherToken::decode("gather:x|-", 2, ours).is_err());
        assert!(GatherToken::decode("by-time/1/ticket-a", 1, ours).is_err());
        assert!(GatherToken::decode(&"gather:-".repeat(10_000), 1, ours).is_err());
        assert!(
            GatherToken(vec![PartitionCursor::Done; 2])
                .encode()
                .is_empty()
        );
    }
}
