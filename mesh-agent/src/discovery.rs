//! Where the mesh's state comes from: the YAML file (`file`) or the Kubernetes API
//! (`kubernetes`). Each sends whole, immutable snapshots over a `watch` channel (the latest
//! wins); `dns` adds the external hosts' addresses; `state::reload` applies them.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;

/// One whole state of the mesh as a source saw it, checked: shared, never changed (a change
/// is a new snapshot).
pub type Snapshot = Arc<Config>;
/// Where a source sends its snapshots; `None` until the first.
pub type Snapshots = watch::Sender<Option<Snapshot>>;

pub mod dns;
pub mod file;
pub mod kubernetes;
