//! Where endpoints run, as balancing sees it: each endpoint's region, zone and node, the level
//! of closeness it has to this node under a service's traffic distribution, and whether a
//! service pinned to regions may use it at all.
//!
//! A level is used while enough of its endpoints are healthy; past that its share of the
//! traffic spills to the next level (Envoy's priority levels, with its overprovisioning
//! factor of 1.4: a level with 5 of 7 endpoints healthy still takes everything).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The Kubernetes well-known label for an endpoint's or a node's region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The Kubernetes well-known label for an endpoint's or a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// How healthy a level must be, as a share of its endpoints, to keep all of its traffic is
/// 1 / this.
const OVERPROVISIONING: f64 = 1.4;

/// Which endpoints a service's callers prefer (Kubernetes' `trafficDistribution`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrafficDistribution {
    /// The caller's zone, then its region, then the rest.
    #[default]
    PreferClose,
    /// The caller's node, then its zone, its region, the rest.
    PreferSameNode,
    /// No preference: every endpoint alike.
    Any,
}

impl TrafficDistribution {
    /// How many levels it sorts endpoints into.
    pub fn levels(self) -> u8 {
        match self {
            TrafficDistribution::PreferClose => 3,
            TrafficDistribution::PreferSameNode => 4,
            TrafficDistribution::Any => 1,
        }
    }
}

/// Where a workload runs: its node, and the node's (or its own) region and zone, where known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality<'a> {
    pub node: &'a str,
    pub region: Option<&'a str>,
    pub zone: Option<&'a str>,
}

impl<'a> Locality<'a> {
    /// The locality of something on `node` with `labels`; a topology label it lacks comes
    /// from `node_labels` (the node's own).
    pub fn of(
        node: &'a str,
        labels: &'a BTreeMap<String, String>,
        node_labels: &'a BTreeMap<String, String>,
    ) -> Self {
        let label = |key| {
            labels
                .get(key)
                .or_else(|| node_labels.get(key))
                .map(String::as_str)
        };
        Self {
            node,
            region: label(REGION_LABEL),
            zone: label(ZONE_LABEL),
        }
    }

    /// The level of an endpoint here for a caller at `caller`: 0 is the closest. A zone is
    /// the same only within the same region, and unknown is never the same.
    pub fn level(&self, caller: &Locality<'_>, distribution: TrafficDistribution) -> u8 {
        let same_region = self.region.is_some() && self.region == caller.region;
        let same_zone = same_region && self.zone.is_some() && self.zone == caller.zone;
        let closeness = match distribution {
            TrafficDistribution::Any => return 0,
            TrafficDistribution::PreferClose => [same_zone, same_region],
            TrafficDistribution::PreferSameNode => {
                if self.node == caller.node {
                    return 0;
                }
                return 1 + Self::first_unmet(&[same_zone, same_region]);
            }
        };
        Self::first_unmet(&closeness)
    }

    /// The index of the first true closeness test, or the count of them.
    fn first_unmet(closeness: &[bool]) -> u8 {
        closeness.iter().position(|&c| c).unwrap_or(closeness.len()) as u8
    }

    /// Whether a service pinned to `allowed` regions may use an endpoint here (an empty
    /// list pins nothing; an endpoint of no known region is never inside a pin).
    pub fn within(&self, allowed: &[String]) -> bool {
        allowed.is_empty() || self.region.is_some_and(|r| allowed.iter().any(|a| a == r))
    }
}

/// Each level's share of the traffic, given how many endpoints each has and how many of them
/// can take a call now: the closest takes what its health covers, the next what is left of
/// that, and so on; if even all of them cover less than everything, they share it by health.
pub fn level_shares(totals: &[usize], healthy: &[usize]) -> Vec<f64> {
    let health: Vec<f64> = totals
        .iter()
        .zip(healthy)
        .map(|(&total, &healthy)| match total {
            0 => 0.0,
            total => (OVERPROVISIONING * healthy as f64 / total as f64).min(1.0),
        })
        .collect();
    let mut left = 1.0_f64;
    let shares: Vec<f64> = health
        .iter()
        .map(|h| {
            let share = h.min(left);
            left -= share;
            share
        })
        .collect();
    let sum: f64 = shares.iter().sum();
    if sum > 0.0 && sum < 1.0 {
        return shares.iter().map(|s| s / sum).collect();
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<'a>(node: &'a str, region: &'a str, zone: &'a str) -> Locality<'a> {
        Locality {
            node,
            region: Some(region),
            zone: Some(zone),
        }
    }

    #[test]
    fn levels_follow_the_distribution() {
        let caller = at("n1", "eu", "eu-a");
        let cases = [
            (at("n1", "eu", "eu-a"), [0, 0, 0]),
            (at("n2", "eu", "eu-a"), [0, 1, 0]),
            (at("n3", "eu", "eu-b"), [1, 2, 0]),
            (at("n4", "us", "eu-a"), [2, 3, 0]),
            (Locality::default(), [2, 3, 0]),
        ];
        for (endpoint, levels) in cases {
            let got = [
                TrafficDistribution::PreferClose,
                TrafficDistribution::PreferSameNode,
                TrafficDistribution::Any,
            ]
            .map(|d| endpoint.level(&caller, d));
            assert_eq!(got, levels, "{endpoint:?}");
        }
    }

    #[test]
    fn a_caller_of_unknown_locality_has_nothing_close() {
        let caller = Locality {
            node: "n1",
            ..Locality::default()
        };
        let endpoint = Locality {
            node: "n2",
            ..Locality::default()
        };
        assert_eq!(endpoint.level(&caller, TrafficDistribution::PreferClose), 2);
    }

    #[test]
    fn labels_fall_back_to_the_node() {
        let node: BTreeMap<String, String> = [(REGION_LABEL, "eu"), (ZONE_LABEL, "eu-a")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let own: BTreeMap<String, String> = [(ZONE_LABEL.to_owned(), "eu-b".to_owned())].into();
        assert_eq!(Locality::of("n1", &own, &node), at("n1", "eu", "eu-b"));
    }

    #[test]
    fn pins_admit_only_known_regions_inside() {
        let allowed = ["eu".to_owned()];
        assert!(at("n1", "eu", "eu-a").within(&allowed));
        assert!(!at("n1", "us", "us-a").within(&allowed));
        assert!(!Locality::default().within(&allowed));
        assert!(Locality::default().within(&[]));
    }

    #[test]
    fn shares_spill_over_as_health_drops() {
        let round = |s: Vec<f64>| s.iter().map(|x| (x * 100.0).round()).collect::<Vec<_>>();
        // 5 of 7 healthy still covers everything.
        assert_eq!(round(level_shares(&[7, 2], &[5, 2])), [100.0, 0.0]);
        // 1 of 3: 47 % stays, the rest goes to the next level.
        assert_eq!(round(level_shares(&[3, 2], &[1, 2])), [47.0, 53.0]);
        // None healthy close by: all to the next.
        assert_eq!(
            round(level_shares(&[3, 2, 4], &[0, 2, 4])),
            [0.0, 100.0, 0.0]
        );
        // Too little anywhere: shared by health.
        assert_eq!(round(level_shares(&[10, 10], &[1, 2])), [33.0, 67.0]);
        assert_eq!(round(level_shares(&[2, 0], &[0, 0])), [0.0, 0.0]);
    }
}
