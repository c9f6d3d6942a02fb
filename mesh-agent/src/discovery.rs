//! Where the mesh's state comes from: the YAML file (`file`) or the Kubernetes API
//! (`kubernetes`). Each sends whole configs over a `watch` channel; `state::reload` applies
//! them.

pub mod file;
pub mod kubernetes;
