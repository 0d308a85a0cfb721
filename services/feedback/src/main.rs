//! The feedback process: `lineguard-feedback --help` lists its flags.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lineguard_bus::ConsumerConfig;
use lineguard_feedback::api::FeedbackService;
use lineguard_feedback::consumers::{self, Observer};
use lineguard_feedback::followups::Feedback;
use lineguard_feedback::projection::FeedbackProjector;
use lineguard_feedback::rules::Rules;
use lineguard_runtime::{CommonArgs, ServiceSpec, parse_duration};
use tonic::service::RoutesBuilder;

/// The Lineguard feedback service: follow-ups, reopens, complaints, praise,
/// scorecards and service stars.
#[derive(Debug, Parser)]
#[command(name = "lineguard-feedback", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The rules file (follow-up limits, repeat window, star rule); the
    /// built-in copy of deploy/feedback.toml when not given.
    #[arg(long, env = "LINEGUARD_FEEDBACK_RULES")]
    rules: Option<String>,
    /// Every follow-up due this soon after resolution, whatever the rules
    /// file says (for demos and tests).
    #[arg(long, value_parser = parse_duration)]
    follow_up_within: Option<Duration>,
    /// How often overdue follow-ups are looked for.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    timer_tick: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    lineguard_runtime::block_on(args.common.blocking_threads, serve(args))
}

/// The process, from its parsed flags to its exit.
async fn serve(args: Args) -> ExitCode {
    let rules = match &args.rules {
        Some(path) => Rules::load(path),
        None => Rules::parse(lineguard_feedback::rules::DEFAULT_RULES),
    };
    let mut rules = match rules {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("lineguard-feedback: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(within) = args.follow_up_within {
        rules = rules.with_follow_up_within(within);
    }
    let spec = ServiceSpec {
        name: lineguard_feedback::SERVICE,
        default_grpc_port: 50054,
        event_types: lineguard_feedback::event_types(),
        projector: Arc::new(FeedbackProjector),
        api_services: vec!["lineguard.feedback.v1.Feedback"],
        mirror: None,
    };
    let tick = args.timer_tick;
    lineguard_runtime::run(spec, args.common, async move |host| {
        let feedback = Feedback::new(host.log.clone(), rules);
        for (name, source, subjects) in [
            (
                consumers::FROM_INTAKE,
                "intake",
                consumers::intake_subjects(),
            ),
            (
                consumers::FROM_ROUTING,
                "routing",
                consumers::routing_subjects(),
            ),
            (
                consumers::FROM_DISPATCH,
                "dispatch",
                consumers::dispatch_subjects(),
            ),
        ] {
            // An event waiting for one of the other two consumers (a route
            // for a ticket not yet seen) is parked and applied when what it
            // waits for lands (see lineguard_bus::parking).
            let config = ConsumerConfig::new(name, source).filtered(subjects);
            host.add_consumer(config, Observer(feedback.clone()))?;
        }
        let overdue = feedback.spawn_overdue_timer(tick);
        host.on_shutdown(overdue.stop());
        let mut routes = RoutesBuilder::default();
        routes.add_service(
            FeedbackService::new(feedback)
                .in_partitions(host.partitions())
                .server(),
        );
        Ok(routes)
    })
    .await
}
