//! The runos kubeadm executors (docs/kubernetes.md):
//!
//! - [`join`]: `GET_CLUSTER_JOIN_CMD`, a typed `kubeadm join` command (and for a control plane
//!   the certificate key and the API server's encryption key, [`encryption`]); secret output,
//!   never logged; any failed step is an error, never a partial command;
//! - [`upgrade`]: `UPGRADE_NODE_K8S`, a phased upgrade over [`upgrade::PackageOps`] (the package
//!   executor's code in the agent: implemented for `runos_packages::Apt`), with the holds put back on failure and the node's version and
//!   Ready read through the Kubernetes API ([`node`]); helm only as a verified download
//!   ([`helm`]) or a package;
//! - [`settings`]: the agent's `[kubernetes]` section.
//!
//! Programs run through the instruction's runner ([`runos_executors::Ctx::run`], [`tool`]):
//! argv only, bounded, killed on cancellation.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod apt;
pub mod encryption;
pub mod helm;
pub mod join;
pub mod node;
pub mod settings;
pub mod tool;
pub mod upgrade;

pub use join::get_cluster_join_cmd;
pub use settings::KubeSettings;
pub use upgrade::{PackageInfo, PackageOps, upgrade_node_k8s};
