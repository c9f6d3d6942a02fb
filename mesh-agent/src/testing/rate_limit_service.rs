//! A rate limit service for tests that speaks Envoy's protocol (`envoy.service.ratelimit.v3`
//! over gRPC, served by tonic): each descriptor, written `key=value,key=value`, may have a
//! limit per minute; a request is over the limit if any of its descriptors is.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
};

use http::Request;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::server::{Grpc, UnaryService};
use tonic_prost::ProstCodec;

use crate::proxy::rate_limit::global::{
    Code, DescriptorStatus, EnvoyHeader, ProtoDuration, RateLimit, RateLimitRequest,
    RateLimitResponse,
};

#[derive(Clone, Default)]
struct Counts {
    /// Requests per minute by descriptor.
    limits: Arc<HashMap<String, u32>>,
    hits: Arc<Mutex<HashMap<String, u32>>>,
    asked: Arc<Mutex<Vec<RateLimitRequest>>>,
}

impl UnaryService<RateLimitRequest> for Counts {
    type Response = RateLimitResponse;
    type Future = Pin<
        Box<dyn Future<Output = Result<tonic::Response<RateLimitResponse>, tonic::Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<RateLimitRequest>) -> Self::Future {
        let request = request.into_inner();
        let mut hits = self.hits.lock().unwrap();
        let statuses: Vec<DescriptorStatus> = request
            .descriptors
            .iter()
            .map(|d| {
                let key = d
                    .entries
                    .iter()
                    .map(|e| format!("{}={}", e.key, e.value))
                    .collect::<Vec<_>>()
                    .join(",");
                let Some(&limit) = self.limits.get(&key) else {
                    return DescriptorStatus {
                        code: Code::Ok as i32,
                        ..Default::default()
                    };
                };
                let hit = hits.entry(key).or_default();
                *hit += request.hits_addend.max(1);
                DescriptorStatus {
                    code: if *hit > limit {
                        Code::OverLimit
                    } else {
                        Code::Ok
                    } as i32,
                    current_limit: Some(RateLimit {
                        requests_per_unit: limit,
                        unit: 2,
                        name: String::new(),
                    }),
                    limit_remaining: limit.saturating_sub(*hit),
                    duration_until_reset: Some(ProtoDuration {
                        seconds: 30,
                        nanos: 0,
                    }),
                }
            })
            .collect();
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        self.asked.lock().unwrap().push(request);
        let response = RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add: vec![EnvoyHeader {
                key: "x-limited-by".into(),
                value: "test-rls".into(),
                raw_value: Vec::new(),
            }],
        };
        Box::pin(async move { Ok(tonic::Response::new(response)) })
    }
}

/// The service: listening until dropped.
pub struct RateLimitServer {
    pub addr: SocketAddr,
    counts: Counts,
    serving: tokio::task::JoinHandle<()>,
}

impl RateLimitServer {
    /// Listens on `addr` with `limits` per minute, by descriptor.
    pub async fn start(addr: SocketAddr, limits: &[(&str, u32)]) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let counts = Counts {
            limits: Arc::new(limits.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            ..Counts::default()
        };
        let serving_counts = counts.clone();
        let serving = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let counts = serving_counts.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let counts = counts.clone();
                    async move {
                        let mut grpc = Grpc::new(ProstCodec::default());
                        Ok::<_, Infallible>(grpc.unary(counts, request).await)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(conn), service),
                );
            }
        });
        Self {
            addr,
            counts,
            serving,
        }
    }

    /// The requests asked so far.
    pub fn asked(&self) -> Vec<RateLimitRequest> {
        self.counts.asked.lock().unwrap().clone()
    }
}

impl Drop for RateLimitServer {
    fn drop(&mut self) {
        self.serving.abort();
    }
}
