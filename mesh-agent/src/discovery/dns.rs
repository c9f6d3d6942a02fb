//! The addresses of declared external hosts: a stage between a source and the apply path
//! that resolves every exact name the snapshot declares, again when its records' TTL runs
//! out, and passes the snapshot on with the addresses (`egress.resolved`) filled in. A name
//! that fails to resolve keeps its last addresses and is tried again shortly.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfigGroup, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use super::{Snapshot, Snapshots};
use crate::config::egress::HostName;

/// The soonest a name is resolved again, whatever its TTL (0 would mean always).
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The latest, whatever its TTL: an address change is seen within this.
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// When a name that failed to resolve is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// The agent's resolver of external hosts' names.
pub struct Resolving {
    resolver: TokioResolver,
}

/// What is known of one name: its addresses (empty until it first resolves) and when to ask
/// again.
struct Known {
    addresses: Vec<IpAddr>,
    due: Instant,
}

impl Resolving {
    /// A resolver asking `servers` (UDP, then TCP), or those of `/etc/resolv.conf` if none
    /// (none at all if it cannot be read: logged).
    pub fn new(servers: &[SocketAddr]) -> Self {
        let mut options = ResolverOpts::default();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        options.positive_max_ttl = Some(MAX_REFRESH);
        let provider = TokioConnectionProvider::default();
        let mut builder = match servers {
            [] => TokioResolver::builder(provider.clone()).unwrap_or_else(|e| {
                // Only external hosts need it: the agent runs, and says what to do.
                warn!("cannot read /etc/resolv.conf, external hosts will not resolve: give the settings' dns_servers ({e})");
                let nowhere = ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::new());
                TokioResolver::builder_with_config(nowhere, provider)
            }),
            servers => {
                let mut group = NameServerConfigGroup::new();
                for server in servers {
                    group.merge(NameServerConfigGroup::from_ips_clear(
                        &[server.ip()],
                        server.port(),
                        true,
                    ));
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], group),
                    provider,
                )
            }
        };
        *builder.options_mut() = options;
        Self {
            resolver: builder.build(),
        }
    }

    /// Passes `first`, then each snapshot of `upstream`, on to `out` with its hosts' addresses,
    /// and again whenever they change; until `upstream` closes.
    pub async fn follow(
        self,
        first: Snapshot,
        mut upstream: watch::Receiver<Option<Snapshot>>,
        out: Snapshots,
    ) {
        let mut source = first;
        let mut known: BTreeMap<HostName, Known> = BTreeMap::new();
        let mut sent: Option<(Snapshot, BTreeMap<HostName, Vec<IpAddr>>)> = None;
        loop {
            let wanted: BTreeSet<&HostName> = source
                .egress
                .hosts
                .iter()
                .flat_map(|h| &h.names)
                .filter(|n| n.wildcard_suffix().is_none())
                .collect();
            known.retain(|name, _| wanted.contains(name));
            let now = Instant::now();
            let due: Vec<HostName> = wanted
                .iter()
                .filter(|name| known.get(**name).is_none_or(|k| k.due <= now))
                .map(|name| (*name).clone())
                .collect();
            self.resolve(&due, &mut known).await;
            let resolved = resolved(&known);
            let unchanged = sent
                .as_ref()
                .is_some_and(|(s, r)| Arc::ptr_eq(s, &source) && *r == resolved);
            if !unchanged {
                out.send_replace(Some(with_addresses(&source, &resolved)));
                sent = Some((source.clone(), resolved));
            }
            let next = known.values().map(|k| k.due).min();
            tokio::select! {
                changed = upstream.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if let Some(snapshot) = upstream.borrow_and_update().clone() {
                        source = snapshot;
                    }
                }
                () = sleep_until(next) => {}
            }
        }
    }

    /// Resolves `names` at once, updating what is `known` of each.
    async fn resolve(&self, names: &[HostName], known: &mut BTreeMap<HostName, Known>) {
        let lookups = names.iter().map(|name| async move {
            // Fully qualified: no search domain is tried.
            let lookup = self.resolver.lookup_ip(format!("{name}.")).await;
            (name, lookup)
        });
        for (name, lookup) in futures::future::join_all(lookups).await {
            let now = Instant::now();
            let entry = known.entry(name.clone()).or_insert(Known {
                addresses: Vec::new(),
                due: now,
            });
            match lookup {
                Ok(lookup) => {
                    let mut addresses: Vec<IpAddr> = lookup.iter().collect();
                    addresses.sort();
                    addresses.dedup();
                    let ttl =
                        Instant::from_std(lookup.valid_until()).saturating_duration_since(now);
                    if addresses != entry.addresses {
                        info!(host = %name, ?addresses, ttl_s = ttl.as_secs(), "external host resolved");
                    }
                    entry.addresses = addresses;
                    entry.due = now + ttl.clamp(MIN_REFRESH, MAX_REFRESH);
                }
                Err(e) => {
                    warn!(host = %name, kept = ?entry.addresses, "cannot resolve an external host, trying again in {RETRY:?}: {e}");
                    entry.due = now + RETRY;
                }
            }
        }
    }
}

/// The addresses of every name that has some.
fn resolved(known: &BTreeMap<HostName, Known>) -> BTreeMap<HostName, Vec<IpAddr>> {
    known
        .iter()
        .filter(|(_, k)| !k.addresses.is_empty())
        .map(|(name, k)| (name.clone(), k.addresses.clone()))
        .collect()
}

/// `source` with `resolved` for its hosts; `source` itself where it declares none.
fn with_addresses(source: &Snapshot, resolved: &BTreeMap<HostName, Vec<IpAddr>>) -> Snapshot {
    if source.egress.hosts.is_empty() {
        return source.clone();
    }
    let mut config = (**source).clone();
    config.egress.resolved = resolved.clone();
    Arc::new(config)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
