//! The dispatch process: `lineguard-dispatch --help` lists its flags.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lineguard_bus::{ConsumerConfig, Mirror};
use lineguard_dispatch::api::DispatchService;
use lineguard_dispatch::consumers::{self, IntakeEvents, RoutingEvents};
use lineguard_dispatch::contacts::ContactOpener;
use lineguard_dispatch::orders::Dispatcher;
use lineguard_dispatch::projection::{DispatchProjector, crew_message};
use lineguard_runtime::{CommonArgs, ServiceSpec, parse_duration};
use tonic::service::RoutesBuilder;

/// The Lineguard dispatch service: work orders to crews' phones.
#[derive(Debug, Parser)]
#[command(name = "lineguard-dispatch", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// How often due clock timers (arrival, restoration) are looked for.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    timer_tick: Duration,
    /// How far a live crew action's device time may be from its receipt
    /// before it is bounded (see the dispatch crate's `device_clock`).
    #[arg(long, env = "LINEGUARD_DEVICE_CLOCK_SKEW", default_value = "2m", value_parser = parse_duration)]
    device_clock_skew: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    lineguard_runtime::block_on(args.common.blocking_threads, serve(args))
}

/// The process, from its parsed flags to its exit.
async fn serve(args: Args) -> ExitCode {
    let spec = ServiceSpec {
        name: lineguard_dispatch::SERVICE,
        default_grpc_port: 50053,
        event_types: lineguard_dispatch::event_types(),
        projector: Arc::new(DispatchProjector),
        api_services: vec!["lineguard.dispatch.v1.Dispatch"],
        mirror: Some(Mirror {
            stream_name: "crew",
            message: crew_message,
        }),
    };
    let tick = args.timer_tick;
    let skew = args.device_clock_skew;
    lineguard_runtime::run(spec, args.common, async move |host| {
        let dispatcher = Dispatcher::new(host.log.clone())
            .with_device_skew(skew)
            .with_calendar(host.calendar.clone());
        host.add_consumer(
            ConsumerConfig::new(consumers::FROM_ROUTING, "routing")
                .filtered(consumers::routing_subjects()),
            RoutingEvents(dispatcher.clone()),
        )?;
        host.add_consumer(
            ConsumerConfig::new(consumers::FROM_INTAKE, "intake")
                .filtered(consumers::intake_subjects()),
            IntakeEvents(dispatcher.clone()),
        )?;
        lineguard_runtime::metrics::clock_alerts_known(&[
            lineguard_dispatch::clocks::ARRIVAL,
            lineguard_dispatch::clocks::RESTORATION,
        ]);
        let clocks = lineguard_dispatch::clocks::spawn(dispatcher.clone(), tick);
        host.on_shutdown(clocks.stop());
        let mut routes = RoutesBuilder::default();
        let intake = host.peer_channel("intake");
        if intake.is_none() {
            tracing::warn!("no --peer intake: crews get their orders without customer contacts");
        }
        let service = DispatchService::new(dispatcher)
            .with_contacts(ContactOpener::new(intake))
            .in_partitions(host.partitions());
        if let Some(registry) = host.metrics_registry() {
            let watchers = service.watchers();
            lineguard_runtime::metrics::register_gauge_fn(
                registry,
                "dispatch_crews_connected",
                "Crews with at least one WatchDispatches stream open",
                move || watchers.crews_connected() as u64,
            );
            let watchers = service.watchers();
            lineguard_runtime::metrics::register_gauge_fn(
                registry,
                "dispatch_watches",
                "WatchDispatches streams open",
                move || watchers.count() as u64,
            );
        }
        routes.add_service(service.server());
        Ok(routes)
    })
    .await
}
