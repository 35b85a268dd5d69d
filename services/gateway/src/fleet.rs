//! The set of agent nodes, kept current without restarts: each configured
//! endpoint whose host is a name is resolved again every
//! `gateway.discovery_interval_ms` and each address it resolves to is one
//! node (a Kubernetes headless service lists every ready pod), and every
//! node's `GetLoad` is polled every `gateway.load_poll_interval_ms`.
//!
//! A node that stays in the set keeps its breaker, counters and latency
//! estimate; a node that leaves is dropped once its calls in flight end.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use agentmesh_client::ClientError;
use agentmesh_proto::agent as agent_pb;
use agentmesh_resilience::BreakerConfig;
use agentmesh_settings::GatewaySettings;
use tokio_util::sync::CancellationToken;

use crate::node::{ConnectOptions, Node};

/// Longest wait for one `GetLoad` answer.
const MAX_LOAD_TIMEOUT: Duration = Duration::from_secs(1);

/// One configured endpoint, split so that a host name can be resolved.
#[derive(Clone, Debug)]
struct Configured {
    /// As configured.
    endpoint: String,
    /// `http` or `https`.
    scheme: String,
    /// Host name; `None` when the host is an address literal.
    host: Option<String>,
    /// Port (the scheme's default when absent).
    port: u16,
}

impl Configured {
    fn parse(endpoint: &str) -> Result<Self, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|error: http::uri::InvalidUri| invalid(&error.to_string()))?;
        let scheme = uri.scheme_str().unwrap_or("http").to_owned();
        let host = uri.host().ok_or_else(|| invalid("has no host"))?;
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        let host = literal.parse::<IpAddr>().is_err().then(|| host.to_owned());
        Ok(Self {
            endpoint: endpoint.to_owned(),
            scheme,
            host,
            port,
        })
    }

    /// The node endpoints this entry stands for now. An address literal is
    /// itself; a name is every IPv4 address it resolves to (IPv6 ones only
    /// when it has no IPv4 address, so that `localhost` is one node).
    async fn resolve(&self) -> std::io::Result<BTreeSet<String>> {
        let Some(host) = &self.host else {
            return Ok(BTreeSet::from([self.endpoint.clone()]));
        };
        let addresses: Vec<IpAddr> = tokio::net::lookup_host((host.as_str(), self.port))
            .await?
            .map(|address| address.ip())
            .collect();
        let v4: Vec<IpAddr> = addresses.iter().copied().filter(IpAddr::is_ipv4).collect();
        let chosen = if v4.is_empty() { addresses } else { v4 };
        Ok(chosen
            .into_iter()
            .map(|ip| match ip {
                IpAddr::V4(ip) => format!("{}://{ip}:{}", self.scheme, self.port),
                IpAddr::V6(ip) => format!("{}://[{ip}]:{}", self.scheme, self.port),
            })
            .collect())
    }
}

/// The agent nodes the gateway routes over.
pub struct Fleet {
    configured: Vec<Configured>,
    nodes: RwLock<Arc<Vec<Arc<Node>>>>,
    options: ConnectOptions,
    discovery_interval: Duration,
    load_interval: Duration,
}

impl Fleet {
    /// A fleet over the configured endpoints (address literals become
    /// nodes at once; names are resolved by [`Fleet::refresh`]).
    pub fn new(
        settings: &GatewaySettings,
        options: ConnectOptions,
        config: BreakerConfig,
    ) -> Result<Self, ClientError> {
        let configured = settings
            .agent_endpoints
            .iter()
            .map(|endpoint| Configured::parse(endpoint))
            .collect::<Result<Vec<_>, _>>()?;
        let nodes = configured
            .iter()
            .filter(|entry| entry.host.is_none())
            .map(|entry| {
                Node::new(&entry.endpoint, &entry.endpoint, &options, config).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            configured,
            nodes: RwLock::new(Arc::new(nodes)),
            options,
            discovery_interval: Duration::from_millis(settings.discovery_interval_ms),
            load_interval: Duration::from_millis(settings.load_poll_interval_ms),
        })
    }

    /// The nodes now (a snapshot; cheap).
    pub fn nodes(&self) -> Arc<Vec<Arc<Node>>> {
        Arc::clone(&self.nodes.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn has_names(&self) -> bool {
        self.configured.iter().any(|entry| entry.host.is_some())
    }

    /// Resolves the configured names again and updates the node set. A
    /// name that fails to resolve keeps the nodes it had.
    pub async fn refresh(&self, config: BreakerConfig) {
        if !self.has_names() {
            return;
        }
        let current = self.nodes();
        let mut wanted: Vec<(String, String)> = Vec::new();
        for entry in &self.configured {
            match entry.resolve().await {
                Ok(endpoints) => {
                    if endpoints.is_empty() {
                        tracing::warn!(
                            endpoint = entry.endpoint,
                            "agent endpoint resolved to no address"
                        );
                    }
                    wanted.extend(
                        endpoints
                            .into_iter()
                            .map(|endpoint| (endpoint, entry.endpoint.clone())),
                    );
                }
                Err(error) => {
                    tracing::warn!(
                        endpoint = entry.endpoint,
                        %error,
                        "cannot resolve agent endpoint; keeping its known nodes"
                    );
                    metrics::counter!("agentmesh_gateway_discovery_errors_total").increment(1);
                    wanted.extend(
                        current
                            .iter()
                            .filter(|node| node.source() == entry.endpoint)
                            .map(|node| (node.endpoint().to_owned(), entry.endpoint.clone())),
                    );
                }
            }
        }
        wanted.sort();
        wanted.dedup_by(|a, b| a.0 == b.0);
        let unchanged = wanted.len() == current.len()
            && wanted
                .iter()
                .all(|(endpoint, _)| current.iter().any(|node| node.endpoint() == endpoint));
        if unchanged {
            return;
        }
        let mut next = Vec::with_capacity(wanted.len());
        for (endpoint, source) in wanted {
            if let Some(known) = current.iter().find(|node| node.endpoint() == endpoint) {
                next.push(Arc::clone(known));
                continue;
            }
            match Node::new(&endpoint, &source, &self.options, config) {
                Ok(node) => {
                    tracing::info!(endpoint, source, "agent node added");
                    next.push(Arc::new(node));
                }
                Err(error) => tracing::warn!(endpoint, %error, "cannot add agent node"),
            }
        }
        for gone in current
            .iter()
            .filter(|node| !next.iter().any(|kept| Arc::ptr_eq(kept, node)))
        {
            tracing::info!(endpoint = gone.endpoint(), "agent node removed");
        }
        metrics::gauge!("agentmesh_gateway_nodes").set(next.len() as f64);
        *self.nodes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
    }

    /// Asks every node for its load once.
    pub async fn poll_load(&self) {
        let nodes = self.nodes();
        let timeout = self.load_interval.min(MAX_LOAD_TIMEOUT);
        futures::future::join_all(nodes.iter().map(|node| async move {
            let mut request = tonic::Request::new(agent_pb::GetLoadRequest {});
            request.set_timeout(timeout);
            let mut client = node.client();
            match tokio::time::timeout(timeout, client.get_load(request)).await {
                Ok(Ok(load)) => node.note_load(load.get_ref()),
                _ => node.forget_load(),
            }
        }))
        .await;
    }

    /// Runs discovery and load polling until `shutdown`; `config` gives
    /// the breaker settings new nodes start with.
    pub fn spawn(
        self: &Arc<Self>,
        config: impl Fn() -> BreakerConfig + Send + 'static,
        shutdown: &CancellationToken,
    ) {
        metrics::gauge!("agentmesh_gateway_nodes").set(self.nodes().len() as f64);
        let fleet = Arc::clone(self);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut discovery = tokio::time::interval(fleet.discovery_interval);
            let mut load = tokio::time::interval(fleet.load_interval);
            discovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            load.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = discovery.tick() => fleet.refresh(config()).await,
                    _ = load.tick() => fleet.poll_load().await,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoints: &[&str]) -> GatewaySettings {
        GatewaySettings {
            agent_endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            ..GatewaySettings::default()
        }
    }

    #[tokio::test]
    async fn address_literals_are_nodes_and_names_resolve_to_one_node_per_address() {
        let fleet = Fleet::new(
            &settings(&[
                "http://127.0.0.1:7001",
                "http://[::1]:7002",
                "http://localhost:7003",
            ]),
            ConnectOptions::default(),
            BreakerConfig::default(),
        )
        .unwrap();
        let endpoints = |fleet: &Fleet| -> Vec<String> {
            fleet
                .nodes()
                .iter()
                .map(|node| node.endpoint().to_owned())
                .collect()
        };
        assert_eq!(
            endpoints(&fleet),
            ["http://127.0.0.1:7001", "http://[::1]:7002"]
        );
        let before = fleet.nodes();
        fleet.refresh(BreakerConfig::default()).await;
        let after = endpoints(&fleet);
        assert_eq!(after.len(), 3, "{after:?}");
        assert!(
            after.contains(&"http://127.0.0.1:7003".to_owned()),
            "{after:?}"
        );
        // Nodes that stay keep their state (same objects).
        let kept = fleet.nodes();
        assert!(
            before
                .iter()
                .all(|old| kept.iter().any(|node| Arc::ptr_eq(node, old)))
        );
        assert_eq!(
            kept.iter()
                .find(|node| node.endpoint() == "http://127.0.0.1:7003")
                .unwrap()
                .source(),
            "http://localhost:7003"
        );
    }

    #[tokio::test]
    async fn a_name_that_stops_resolving_keeps_its_nodes() {
        let fleet = Fleet::new(
            &settings(&["http://name-that-does-not-exist.invalid:7001"]),
            ConnectOptions::default(),
            BreakerConfig::default(),
        )
        .unwrap();
        fleet.refresh(BreakerConfig::default()).await;
        assert!(fleet.nodes().is_empty());
    }
}
