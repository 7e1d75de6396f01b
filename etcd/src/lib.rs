//! etcd membership for runos, through the etcd v3 gRPC API (`etcd-client`), never `etcdctl`
//! text (docs/etcd.md).
//!
//! - [`Settings`]: the `[etcd]` configuration section (endpoints, TLS files, bounded waits);
//! - [`cluster_info`]: members with their role and each member's own health, the leader, the
//!   cluster id, raft index and database size (`runos etcd list`);
//! - [`remove_member`]: find the member exactly (peer URL host compared as an IP address),
//!   check quorum with real numbers, move leadership off it first when it leads, remove it
//!   through another member, verify (`REMOVE_ETCD_MEMBER`, `runos etcd remove`);
//! - [`executor::remove_etcd_member`]: the executor;
//! - [`rules`]: the pure matching and quorum rules.
//!
//! TLS is tonic's rustls with the ring provider passed explicitly by tonic (`tls-ring`), so no
//! process-level `CryptoProvider` is needed or installed.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod client;
pub mod executor;
pub mod info;
pub mod record;
pub mod remove;
pub mod rules;
pub mod settings;

pub use client::EtcdError;
pub use info::{ClusterInfo, Health, MemberInfo, cluster_info, id_hex, parse_id};
pub use remove::{Kind, RemoveError, RemoveOptions, Removed, Target, remove_member};
pub use settings::Settings;
