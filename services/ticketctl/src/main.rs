//! `ticketctl`: replay, inspect and exercise a running Lineguard backend.
//! `ticketctl --help` lists the commands; every command has `--help` and
//! `--json`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lineguard_protos::eventlog::v1::RebuildProjectionsRequest;
use lineguard_ticketctl::endpoints::{Clients, Endpoints, SERVICES};
use lineguard_ticketctl::simulate::{self, StormConfig};
use lineguard_ticketctl::state::ticket_state;
use lineguard_ticketctl::tail::{self, Filter};
use lineguard_ticketctl::{Error, consumers, parse_instant, replay, timeline, verify};
use serde::Serialize;

/// The operator's CLI for Lineguard: the whole life of any ticket or
/// incident, event by event, from the four services' logs.
#[derive(Debug, Parser)]
#[command(name = "ticketctl", version, about)]
struct Cli {
    #[command(flatten)]
    endpoints: Endpoints,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay a ticket or an incident: every event of all four services, in
    /// causal order, with durations, holders, warnings and breaches.
    Replay {
        #[command(subcommand)]
        what: ReplayWhat,
    },
    /// Live events from all four services, filtered.
    Tail {
        /// Only these services (repeatable): intake, routing, dispatch, feedback.
        #[arg(long)]
        service: Vec<String>,
        /// Only event types containing this (e.g. Routed, Clock).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events of this ticket, incident or case id.
        #[arg(long)]
        correlation: Option<String>,
        /// Start from the beginning of each log instead of now.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Also the copies services keep of each other's events.
        #[arg(long)]
        with_copies: bool,
    },
    /// Drop a service's projections and rebuild them from its log (or all
    /// four); prints the projection digests before and after.
    Rebuild {
        /// intake, routing, dispatch, feedback, or all.
        service: String,
    },
    /// Replay every ticket and compare with intake's live view; lists each
    /// mismatch. Exits 1 if there is any.
    Verify,
    /// Draw a ticket's or an incident's timeline.
    Timeline {
        #[command(subcommand)]
        what: TimelineWhat,
    },
    /// Drive traffic against the running backend.
    Simulate {
        #[command(subcommand)]
        what: SimulateWhat,
    },
    /// Write generated files (a county of any size) for routing to load.
    Generate {
        #[command(subcommand)]
        what: GenerateWhat,
    },
    /// A district's printable meter-box labels (A4 SVG pages): the
    /// manager's, the station's and the supervision line's numbers and a QR
    /// code to report a fault online for each account.
    Sheet {
        /// The district.
        district_id: String,
        /// Directory to write `<district>-p01.svg`, … into.
        #[arg(long)]
        out: String,
        /// The online report page; each label's QR code adds `?account=…`.
        #[arg(long, default_value = "https://www.95598.cn/report")]
        report_url: String,
    },
    /// Erase a customer's data (administrators): destroys their data key,
    /// so their name, phone, address and descriptions cannot be read
    /// anywhere any more; their tickets and every figure stay.
    EraseCustomer {
        /// The customer's account number.
        #[arg(long, default_value = "")]
        account: String,
        /// The customer's phone (for reports made without an account).
        #[arg(long, default_value = "")]
        phone: String,
        /// Why (recorded with the erasure).
        #[arg(long)]
        reason: String,
    },
    /// Every service at a glance: health, log head, outbox backlog, each
    /// consumer's lag, parked and dead-lettered events, connected crews;
    /// exits 1 when something needs a person (a service down or not
    /// serving, an outbox stuck, dead letters, a lag JetStream cannot tell).
    Status,
    /// An online backup of a service's whole store (administrators): a
    /// checkpoint taken while it serves, written to DIR (new or empty) with
    /// a manifest of its head, projection digest and every file's SHA-256.
    Backup {
        /// intake, routing, dispatch or feedback.
        service: String,
        /// Where to write it.
        dir: std::path::PathBuf,
    },
    /// Put a backup (checked file by file) into an empty data directory;
    /// start the service there (the same --data-dir) to serve it.
    Restore {
        /// The backup's directory.
        dir: std::path::PathBuf,
        /// The service's new data directory (its eventlog/ must not exist).
        data_dir: std::path::PathBuf,
    },
    /// Events each service's consumers parked until what they wait for
    /// arrives (they are applied then, or at the next sweep).
    Parked {
        /// Only these services (repeatable).
        #[arg(long)]
        service: Vec<String>,
        /// Listed per service at most (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Events each service's consumers could not apply (dead letters);
    /// exits 1 if there is any. `deadletters retry` sends one back.
    Deadletters {
        #[command(subcommand)]
        what: Option<DeadlettersWhat>,
        /// Only these services (repeatable).
        #[arg(long)]
        service: Vec<String>,
        /// Listed per service at most (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Make and issue credentials (see the README's "Credentials").
    Credentials {
        #[command(subcommand)]
        what: CredentialsWhat,
    },
}

#[derive(Debug, Subcommand)]
enum CredentialsWhat {
    /// Make, once, a development set in DIR: a CA, every service's
    /// certificate, `admin:dev` and `intake_system:dev`, a token key. A
    /// directory that has a CA already is left as it is.
    Init {
        /// The credentials directory.
        #[arg(long, default_value = ".lineguard/credentials")]
        dir: std::path::PathBuf,
    },
    /// Issue a client (or, with --server-name, server) certificate for
    /// `<role>:<id>`, signed by DIR's CA: `<role>-<id>.pem` and `.key`.
    Certificate {
        /// The credentials directory (with `ca.key`).
        #[arg(long, default_value = ".lineguard/credentials")]
        dir: std::path::PathBuf,
        /// The principal's role (see deploy/access.toml).
        #[arg(long)]
        role: String,
        /// The principal's id.
        #[arg(long)]
        id: String,
        /// Names the certificate serves as a server (repeatable).
        #[arg(long)]
        server_name: Vec<String>,
        /// Validity, e.g. 90d.
        #[arg(long, default_value = "90d", value_parser = lineguard_runtime::parse_duration)]
        valid_for: std::time::Duration,
    },
    /// Print the `tls` and `authorization` blocks of the NATS server's
    /// configuration for DIR: TLS with DIR's `nats-local` certificate,
    /// client certificates mapped to users, each service held to the
    /// subjects it publishes and consumes, each --operator with every right.
    /// With --cluster-listen, also the node's `cluster` block: routes over
    /// mutual TLS, joined only by the NATS server's own certificate.
    NatsConfig {
        /// The credentials directory.
        #[arg(long, default_value = ".lineguard/credentials")]
        dir: std::path::PathBuf,
        /// An operator's certificate principal, `role:id` (repeatable).
        #[arg(long, default_value = "admin:dev")]
        operator: Vec<String>,
        /// A cluster node's route address, `host:port` (e.g. 0.0.0.0:6222).
        #[arg(long)]
        cluster_listen: Option<String>,
        /// The cluster's name, the same on every node.
        #[arg(long, default_value = "lineguard", requires = "cluster_listen")]
        cluster_name: String,
        /// A peer's route URL, e.g. nats-route://nats-2:6222 (repeatable;
        /// a node's own URL in the list is ignored).
        #[arg(long, requires = "cluster_listen")]
        route: Vec<String>,
        /// Print only the `authorization` block, for a server whose TLS and
        /// cluster are configured elsewhere (deploy/k8s/nats-values.yaml
        /// includes it); DIR is not read.
        #[arg(long, conflicts_with = "cluster_listen")]
        authorization_only: bool,
        /// How many partitions every service is split into (the services'
        /// `--partitions`): each service's user may then act for every
        /// partition's streams, consumers and copy.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        partitions: u16,
    },
    /// Issue a token (printed) for a phone or an operator, signed by DIR's
    /// token key.
    Token {
        /// The credentials directory (with `token.key`).
        #[arg(long, default_value = ".lineguard/credentials")]
        dir: std::path::PathBuf,
        /// The principal's role (see deploy/access.toml).
        #[arg(long)]
        role: String,
        /// Who: a person's or a phone's id.
        #[arg(long)]
        subject: String,
        /// For a crew's phone: its crew.
        #[arg(long, default_value = "")]
        crew: String,
        /// For a phone: its device id.
        #[arg(long, default_value = "")]
        device: String,
        /// Lifetime, at most 7d.
        #[arg(long, default_value = "24h", value_parser = lineguard_runtime::parse_duration)]
        lifetime: std::time::Duration,
    },
}

/// Runs a `credentials` command: nothing to call, only files.
fn credentials(what: CredentialsWhat) -> Result<ExitCode, Error> {
    use lineguard_runtime::credentials::{CredentialsDir, ensure_development_set};
    let failed = |e: lineguard_runtime::auth::CredentialError| Error::Usage(e.to_string());
    match what {
        CredentialsWhat::Init { dir } => {
            ensure_development_set(&dir).map_err(failed)?;
            println!("{}", dir.display());
        }
        CredentialsWhat::Certificate {
            dir,
            role,
            id,
            server_name,
            valid_for,
        } => {
            let names: Vec<&str> = server_name.iter().map(String::as_str).collect();
            let dir = CredentialsDir::new(dir);
            dir.issue_certificate(&role, &id, &names, valid_for)
                .map_err(failed)?;
            let (cert, key) = dir.principal(&role, &id);
            println!("{}\n{}", cert.display(), key.display());
        }
        CredentialsWhat::NatsConfig {
            dir,
            operator,
            cluster_listen,
            cluster_name,
            route,
            authorization_only,
            partitions,
        } => {
            let mut operators = Vec::new();
            for principal in &operator {
                let (role, id) = principal.split_once(':').ok_or_else(|| {
                    Error::Usage(format!("--operator {principal}: expected role:id"))
                })?;
                operators.push((role, id));
            }
            if authorization_only {
                print!(
                    "{}",
                    lineguard_runtime::bus_access::nats_authorization_block(&operators, partitions)
                );
                return Ok(ExitCode::SUCCESS);
            }
            let credentials = CredentialsDir::new(dir);
            let mut text = lineguard_runtime::bus_access::nats_server_security(
                &credentials,
                &operators,
                partitions,
            )
            .map_err(|e| Error::Usage(e.to_string()))?;
            if let Some(listen) = cluster_listen {
                let node = lineguard_runtime::bus_access::ClusterNode {
                    cluster: cluster_name,
                    listen,
                    routes: route,
                };
                text.push_str(
                    &lineguard_runtime::bus_access::nats_cluster_block(&credentials, &node)
                        .map_err(|e| Error::Usage(e.to_string()))?,
                );
            }
            print!("{text}");
        }
        CredentialsWhat::Token {
            dir,
            role,
            subject,
            crew,
            device,
            lifetime,
        } => {
            let token = CredentialsDir::new(dir)
                .token_issuer()
                .and_then(|issuer| issuer.issue(&subject, &role, &crew, &device, lifetime))
                .map_err(failed)?;
            println!("{token}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
enum GenerateWhat {
    /// A county: directory TOML and accounts CSV (`county.toml`,
    /// `county-accounts.csv`), for `lineguard-routing --directory`.
    County {
        #[command(flatten)]
        config: lineguard_ticketctl::county::CountyConfig,
        /// Directory to write the two files into.
        #[arg(long)]
        out: String,
    },
    /// A province: ten companies, 100 stations, 5,000 districts, 1,500
    /// managers, 300 crews, 1,000,000 accounts (other sizes: `generate
    /// county` with its flags). The same files as `county`.
    Province {
        /// Seed of the choices (area classes, household counts, accounts).
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Directory to write the two files into.
        #[arg(long)]
        out: String,
    },
}

#[derive(Debug, Subcommand)]
enum DeadlettersWhat {
    /// Send a dead letter back through its consumer (after fixing its cause).
    Retry {
        /// intake, routing, dispatch or feedback.
        service: String,
        /// The consumer that dead-lettered it.
        consumer: String,
        /// The event's id.
        event_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ReplayWhat {
    /// One ticket (a child ticket includes its incident's handling).
    Ticket {
        id: String,
        /// Show the ticket as it was at this instant (RFC 3339).
        #[arg(long)]
        as_of: Option<String>,
    },
    /// One incident and every ticket in it.
    Incident {
        id: String,
        /// Show each ticket as it was at this instant (RFC 3339).
        #[arg(long)]
        as_of: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TimelineWhat {
    /// An incident's timeline.
    Incident {
        id: String,
        /// Write a self-contained HTML page (with an SVG) here.
        #[arg(long)]
        html: String,
    },
    /// A ticket's timeline.
    Ticket {
        id: String,
        /// Write a self-contained HTML page (with an SVG) here.
        #[arg(long)]
        html: String,
    },
}

#[derive(Debug, Subcommand)]
enum SimulateWhat {
    /// A storm: correlated outages, repeat callers, crews with realistic
    /// delays, late arrivals, returns, escalations, follow-ups.
    Storm {
        #[command(flatten)]
        config: StormConfig,
    },
}

fn progress(json: bool, what: &str) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(what.to_string());
    bar
}

fn print_json(value: &impl Serialize) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Usage(format!("cannot write JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

#[derive(Serialize)]
struct AsOf {
    as_of: String,
    tickets: Vec<lineguard_ticketctl::state::TicketState>,
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    let command = match cli.command {
        Command::Credentials { what } => return credentials(what),
        other => other,
    };
    let clients = Clients::new(&cli.endpoints)?;
    match command {
        // Handled above, before any client is made.
        Command::Credentials { what } => return credentials(what),
        Command::Replay { what } => {
            let (replayed, as_of) = match what {
                ReplayWhat::Ticket { id, as_of } => (replay::ticket(&clients, &id).await?, as_of),
                ReplayWhat::Incident { id, as_of } => {
                    let bar = progress(cli.json, "reading");
                    let replayed = replay::incident_with_progress(&clients, &id, &bar).await?;
                    bar.finish_and_clear();
                    (replayed, as_of)
                }
            };
            if let Some(text) = as_of {
                let at = parse_instant(&text)?;
                let ids: Vec<&String> = if replayed.kind == "ticket" {
                    vec![&replayed.id]
                } else {
                    replayed.correlation_ids.iter().skip(1).collect()
                };
                let tickets = ids
                    .into_iter()
                    .filter_map(|id| ticket_state(id, &replayed.events, Some(at)))
                    .collect::<Vec<_>>();
                if cli.json {
                    print_json(&AsOf {
                        as_of: timeline::rfc3339(at),
                        tickets,
                    })?;
                } else {
                    println!("as of {}:", timeline::rfc3339(at));
                    for t in tickets {
                        println!(
                            "  {} {} line {} {} crew {} hops {} urges {} warnings {} breaches {}{}",
                            t.ticket_id,
                            t.status,
                            t.line,
                            if t.holder.is_empty() { "-" } else { &t.holder },
                            if t.crew.is_empty() { "-" } else { &t.crew },
                            t.hops,
                            t.urges,
                            t.warnings,
                            t.breaches,
                            if t.closed_reason.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", t.closed_reason)
                            }
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let laid_out = timeline::build(&replayed);
            if cli.json {
                print_json(&laid_out)?;
            } else {
                print!("{}", timeline::render_text(&laid_out));
            }
        }
        Command::EraseCustomer {
            account,
            phone,
            reason,
        } => {
            let erased = clients
                .intake()
                .erase_customer(lineguard_protos::intake::v1::EraseCustomerRequest {
                    account_number: account,
                    phone,
                    reason,
                })
                .await
                .map_err(Error::service("intake"))?
                .into_inner();
            if cli.json {
                print_json(&serde_json::json!({
                    "erased_customer_keys": erased.erased_customer_keys,
                    "tickets": erased.tickets,
                }))?;
            } else if erased.erased_customer_keys.is_empty() {
                println!("no data of that customer was held");
            } else {
                println!(
                    "erased {} ({} tickets)",
                    erased.erased_customer_keys.join(", "),
                    erased.tickets
                );
            }
        }
        Command::Sheet {
            district_id,
            out,
            report_url,
        } => {
            let pages = lineguard_ticketctl::sheet::write_sheet(
                &clients,
                &district_id,
                &report_url,
                std::path::Path::new(&out),
            )
            .await?;
            if cli.json {
                print_json(&pages)?;
            } else {
                for page in &pages {
                    println!("{}", page.display());
                }
            }
        }
        Command::Tail {
            service,
            event_type,
            correlation,
            from_start,
            count,
            with_copies,
        } => {
            for s in &service {
                if !SERVICES.contains(&s.as_str()) {
                    return Err(Error::Usage(format!(
                        "--service {s}: one of intake, routing, dispatch, feedback"
                    )));
                }
            }
            let filter = Filter {
                services: service,
                event_type,
                correlation,
                with_copies,
            };
            let json = cli.json;
            tail::tail(&clients, &filter, from_start, count, |e| {
                if json {
                    let value = serde_json::json!({
                        "service": e.source,
                        "position": e.global_position,
                        "recorded_at": timeline::rfc3339(replay::recorded_nanos(e)),
                        "event_type": e.event_type,
                        "stream_id": e.stream_id,
                        "correlation_id": e.correlation_id,
                        "causation_id": e.causation_id,
                        "what": timeline::describe(e),
                    });
                    println!("{value}");
                } else {
                    println!("{}", tail::line(e));
                }
                let _ = std::io::stdout().flush();
            })
            .await?;
        }
        Command::Rebuild { service } => {
            let services: Vec<&str> = if service == "all" {
                SERVICES.to_vec()
            } else if SERVICES.contains(&service.as_str()) {
                vec![service.as_str()]
            } else {
                return Err(Error::Usage(format!(
                    "unknown service {service}: intake, routing, dispatch, feedback or all"
                )));
            };
            let bar = progress(cli.json, "rebuilding");
            bar.set_length(services.len() as u64);
            let mut results = Vec::new();
            for s in services {
                let answer = clients
                    .log(s)?
                    .rebuild_projections(RebuildProjectionsRequest {})
                    .await
                    .map_err(Error::service(s))?
                    .into_inner();
                bar.inc(1);
                results.push(answer);
            }
            bar.finish_and_clear();
            let all_same = results.iter().all(|r| r.digest_before == r.digest_after);
            if cli.json {
                let rows: Vec<_> = results
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "service": r.service,
                            "events_replayed": r.events_replayed,
                            "digest_before": r.digest_before,
                            "digest_after": r.digest_after,
                            "same": r.digest_before == r.digest_after,
                        })
                    })
                    .collect();
                print_json(&rows)?;
            } else {
                for r in &results {
                    println!(
                        "{:<8} {} events replayed; digest {} {} {}",
                        r.service,
                        r.events_replayed,
                        &r.digest_before[..16.min(r.digest_before.len())],
                        if r.digest_before == r.digest_after {
                            "=="
                        } else {
                            "!="
                        },
                        &r.digest_after[..16.min(r.digest_after.len())]
                    );
                }
            }
            if !all_same {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Verify => {
            let bar = progress(cli.json, "verifying");
            let report = verify::verify(&clients, &bar).await?;
            bar.finish_and_clear();
            if cli.json {
                print_json(&report)?;
            } else {
                println!(
                    "{} tickets replayed ({} events): {} mismatches",
                    report.tickets,
                    report.events_replayed,
                    report.mismatches.len()
                );
                for m in &report.mismatches {
                    println!(
                        "  {} {}: replayed {:?}, live {:?}",
                        m.ticket_id, m.field, m.replayed, m.live
                    );
                }
                println!(
                    "{} loads recounted ({} open tickets held): {} mismatches",
                    report.loads_checked,
                    report.open_tickets_held,
                    report.load_mismatches.len()
                );
                for m in &report.load_mismatches {
                    println!(
                        "  {}: stored {}, recounted {}",
                        m.assignee_id, m.stored, m.recounted
                    );
                }
            }
            if !report.is_clean() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Timeline { what } => {
            let (replayed, path) = match what {
                TimelineWhat::Incident { id, html } => {
                    let bar = progress(cli.json, "reading");
                    let replayed = replay::incident_with_progress(&clients, &id, &bar).await?;
                    bar.finish_and_clear();
                    (replayed, html)
                }
                TimelineWhat::Ticket { id, html } => (replay::ticket(&clients, &id).await?, html),
            };
            let laid_out = timeline::build(&replayed);
            std::fs::write(&path, timeline::render_html(&laid_out))?;
            if cli.json {
                print_json(&serde_json::json!({
                    "file": path,
                    "events": laid_out.events,
                    "lanes": laid_out.holdings.iter().map(|h| h.lane.clone()).collect::<std::collections::BTreeSet<_>>(),
                    "breaches": laid_out.breaches,
                }))?;
            } else {
                println!(
                    "wrote {path}: {} events, {} breaches",
                    laid_out.events, laid_out.breaches
                );
            }
        }
        Command::Generate { what } => {
            let (config, out) = match what {
                GenerateWhat::County { config, out } => (config, out),
                GenerateWhat::Province { seed, out } => (
                    lineguard_ticketctl::county::CountyConfig::province(seed),
                    out,
                ),
            };
            let generated =
                lineguard_ticketctl::county::generate(&config, std::path::Path::new(&out))?;
            if cli.json {
                print_json(&generated)?;
            } else {
                println!(
                    "{} companies, {} stations, {} districts, {} managers, {} crews, {} accounts: {} and {}",
                    generated.companies,
                    generated.stations,
                    generated.districts,
                    generated.managers,
                    generated.crews,
                    generated.account_count,
                    generated.directory.display(),
                    generated.accounts.display()
                );
            }
        }
        Command::Backup { service, dir } => {
            if !SERVICES.contains(&service.as_str()) {
                return Err(Error::Usage(format!(
                    "unknown service {service}: intake, routing, dispatch or feedback"
                )));
            }
            let manifest = lineguard_ticketctl::backup::backup(&clients, &service, &dir).await?;
            if cli.json {
                print_json(&manifest)?;
            } else {
                println!(
                    "{}: backed up to {} (head {}, projection digest {}, {} files)",
                    manifest.service,
                    dir.display(),
                    manifest.head_position,
                    manifest.projection_digest,
                    manifest.files.len()
                );
            }
        }
        Command::Restore { dir, data_dir } => {
            let manifest = lineguard_ticketctl::backup::restore(&dir, &data_dir)?;
            if cli.json {
                print_json(&manifest)?;
            } else {
                println!(
                    "{}: restored into {} (head {}, projection digest {}); start it with --data-dir {}",
                    manifest.service,
                    data_dir.display(),
                    manifest.head_position,
                    manifest.projection_digest,
                    data_dir.display()
                );
            }
        }
        Command::Status => {
            let status = lineguard_ticketctl::status::status(&clients).await;
            if cli.json {
                print_json(&status)?;
            } else {
                print!("{}", lineguard_ticketctl::status::render(&status));
            }
            if !status.healthy {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Parked { service, limit } => {
            let held = consumers::held(&clients, &service, limit, consumers::Kind::Parked).await?;
            print_held(cli.json, "parked", &held)?;
        }
        Command::Deadletters {
            what:
                Some(DeadlettersWhat::Retry {
                    service,
                    consumer,
                    event_id,
                }),
            ..
        } => {
            consumers::retry(&clients, &service, &consumer, &event_id).await?;
            if cli.json {
                print_json(&serde_json::json!({ "requeued": event_id }))?;
            } else {
                println!("{event_id} sent back to {service}'s consumer {consumer}");
            }
        }
        Command::Deadletters {
            what: None,
            service,
            limit,
        } => {
            let held =
                consumers::held(&clients, &service, limit, consumers::Kind::DeadLetters).await?;
            print_held(cli.json, "dead letters", &held)?;
            if held.iter().any(|h| h.total > 0) {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Simulate {
            what: SimulateWhat::Storm { config },
        } => {
            let bar = progress(cli.json, "calls");
            let report = simulate::storm(&clients, &config, &bar).await?;
            bar.finish_and_clear();
            if cli.json {
                print_json(&report)?;
            } else {
                print_storm(&report);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_held(json: bool, what: &str, held: &[consumers::Held]) -> Result<(), Error> {
    if json {
        return print_json(&held);
    }
    for h in held {
        println!("{}: {} {what}", h.service, h.total);
        for e in &h.entries {
            println!(
                "  {} {} {} ({}): {}",
                e.consumer, e.event_id, e.event_type, e.correlation_id, e.detail
            );
        }
    }
    Ok(())
}

fn print_storm(r: &simulate::StormReport) {
    println!(
        "{} calls in {:.1}s ({:.1}/s, {} retried): {} new tickets, {} joined incidents, {} urges",
        r.calls,
        r.seconds,
        r.calls_per_second,
        r.retries,
        r.new_tickets,
        r.joined_incidents,
        r.urges
    );
    if r.calls_shed > 0 || r.refused_by_backend > 0 {
        println!(
            "{} calls shed (every agent busy, --max-in-flight), {} refused by intake (too many in flight) and retried",
            r.calls_shed, r.refused_by_backend
        );
    }
    println!(
        "crews: {} orders, {} acknowledged ({} slowly: escalations), {} arrived on time, {} late, {} returned, {} completed",
        r.orders_received,
        r.acknowledged,
        r.slow_acknowledgements,
        r.arrived_on_time,
        r.arrived_late,
        r.returned,
        r.completed
    );
    println!(
        "desks: {} answered; follow-ups: {} satisfied, {} dissatisfied, {} reopened",
        r.desk_answered, r.follow_ups_satisfied, r.follow_ups_dissatisfied, r.reopened
    );
    let p = |name: &str, p: &simulate::Percentiles| {
        println!(
            "{name}: n={} p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            p.count, p.p50, p.p90, p.p99, p.max
        );
    };
    p("ReportTicket round trip", &r.report_latency_ms);
    p(
        "call that caused an order -> crew receives it",
        &r.report_to_crew_ms,
    );
    if r.orders_not_caused_by_a_call > 0 {
        println!(
            "orders after an escalation (no call caused them, not timed): {}",
            r.orders_not_caused_by_a_call
        );
    }
    for (what, n) in &r.errors {
        println!("refused: {what} ×{n}");
    }
    if let Some(left) = r.not_done {
        println!(
            "not done when the settle time ran out: {} tickets still held, {} follow-ups still open",
            left.held_tickets, left.open_follow_ups
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match tokio::time::timeout(Duration::from_secs(24 * 3600), run(cli)).await {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("ticketctl: {e}");
            ExitCode::from(2)
        }
        Err(_) => {
            eprintln!("ticketctl: gave up after a day");
            ExitCode::from(2)
        }
    }
}
