//! The Kubernetes source of the mesh's state: the cluster's objects turned into the same
//! config the YAML file describes, and where the kubelet keeps each pod's cgroup.

pub mod cgroups;
pub mod model;
pub mod watch;
