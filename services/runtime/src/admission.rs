//! Admission control: a bound on the calls a service decides at once.
//!
//! A service offered more than it can take must not queue without end:
//! every queued call holds its request, its task and its client's
//! connection, so an overload would grow the process until the machine
//! kills it, and the callers' answers would come later and later. Past
//! [`AdmissionLayer`]'s bound a call is answered `RESOURCE_EXHAUSTED` at
//! once; callers retry with the same idempotency key after a pause (every
//! command here is idempotent), so nothing is lost and nothing is done
//! twice.
//!
//! A permit is held until the service's answer starts: the whole of a
//! unary call, the opening of a stream. A crew's `WatchDispatches` that is
//! streaming holds none, so connected phones never crowd out the calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::sync::Semaphore;

/// Paths never refused: health and reflection must answer an operator
/// (and a load balancer) precisely when the service is busiest.
fn is_exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// The tower layer bounding a server's calls in flight.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    service: &'static str,
    limit: usize,
    permits: Arc<Semaphore>,
    refused: AtomicU64,
}

impl AdmissionLayer {
    /// At most `limit` calls (at least one) of `service` in flight.
    pub fn new(service: &'static str, limit: usize) -> AdmissionLayer {
        let limit = limit.max(1);
        AdmissionLayer {
            shared: Arc::new(Shared {
                service,
                limit,
                permits: Arc::new(Semaphore::new(limit)),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// Calls refused since start.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.shared.limit - self.shared.permits.available_permits()
    }
}

impl<S> tower_layer::Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> AdmissionService<S> {
        AdmissionService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// A service wrapped by [`AdmissionLayer`].
#[derive(Clone, Debug)]
pub struct AdmissionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> tower_service::Service<http::Request<B>> for AdmissionService<S>
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if is_exempt(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        match self.shared.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let answer = self.inner.call(request);
                Box::pin(async move {
                    let answer = answer.await;
                    drop(permit);
                    answer
                })
            }
            Err(_) => {
                let refused = self.shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
                // One line per thousand refusals: an overload must show in
                // the log without flooding it.
                if refused % 1_000 == 1 {
                    tracing::warn!(service = self.shared.service, limit = self.shared.limit,
                        refused, rpc = %request.uri().path(), "calls refused: too many in flight");
                }
                let status = tonic::Status::resource_exhausted(format!(
                    "{} is deciding {} calls at once, its limit (--max-requests-in-flight): \
                     retry after a pause with the same idempotency key",
                    self.shared.service, self.shared.limit
                ));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower_layer::Layer;
    use tower_service::Service;

    /// A service whose calls each wait for a permit of `release`.
    #[derive(Clone)]
    struct Held {
        release: Arc<Semaphore>,
    }

    impl tower_service::Service<http::Request<()>> for Held {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let release = self.release.clone();
            Box::pin(async move {
                if let Ok(permit) = release.acquire().await {
                    permit.forget();
                }
                Ok(http::Response::new(tonic::body::Body::empty()))
            })
        }
    }

    fn call_to(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(path)
            .body(())
            .expect("a valid request")
    }

    fn grpc_status(response: &http::Response<tonic::body::Body>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    #[tokio::test]
    async fn calls_past_the_limit_are_refused_at_once_and_health_never_is() {
        let release = Arc::new(Semaphore::new(0));
        let layer = AdmissionLayer::new("intake", 2);
        let mut service = layer.layer(Held {
            release: release.clone(),
        });
        let first = tokio::spawn(service.call(call_to("/lineguard.intake.v1.Intake/ReportTicket")));
        let second =
            tokio::spawn(service.call(call_to("/lineguard.intake.v1.Intake/ReportTicket")));
        tokio::task::yield_now().await;
        assert_eq!(layer.in_flight(), 2);

        let refused = service
            .call(call_to("/lineguard.intake.v1.Intake/ReportTicket"))
            .await
            .expect("an answer");
        // RESOURCE_EXHAUSTED is gRPC status 8.
        assert_eq!(grpc_status(&refused).as_deref(), Some("8"));
        assert_eq!(layer.refused(), 1);

        // Health still answers (its call is let through, not counted).
        let health = tokio::spawn(service.call(call_to("/grpc.health.v1.Health/Check")));
        tokio::task::yield_now().await;
        assert_eq!(layer.in_flight(), 2);

        // Once the held calls are answered, their permits come back.
        release.add_permits(3);
        for held in [first, second, health] {
            let answer = held.await.expect("joined").expect("answered");
            assert_eq!(grpc_status(&answer), None, "a call let through is answered");
        }
        assert_eq!(layer.in_flight(), 0);
        let again = tokio::spawn(service.call(call_to("/lineguard.intake.v1.Intake/GetTicket")));
        tokio::task::yield_now().await;
        assert_eq!(layer.in_flight(), 1);
        release.add_permits(1);
        let answer = again.await.expect("joined").expect("answered");
        assert_eq!(grpc_status(&answer), None);
        assert_eq!(layer.refused(), 1);
    }
}
