//! The Kubernetes source of the mesh's state: the cluster's objects turned into the same
//! config the YAML file describes (`model`, with the Gateway API's routes: `gateway`, and the
//! mesh's own TrafficPolicy: `policy`, AuthorizationPolicy: `authorization` and
//! ExternalHost: `egress`, each kept at its last good version: `last_good`), where the
//! kubelet keeps each pod's cgroup (`cgroups`), and the watch that follows them (`watch`).

pub mod authorization;
pub mod cgroups;
pub mod egress;
pub mod gateway;
pub mod last_good;
pub mod model;
pub mod policy;
pub mod watch;
