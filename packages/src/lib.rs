//! The runos package executor: `INSTALL_PACKAGES`, `REMOVE_PACKAGES` and `GET_PACKAGES`
//! (docs/protocol.md §10, docs/packages.md), and the library API other executors use to
//! install exact versions and move holds (the kubeadm upgrade) and to find what the agent
//! installed (the uninstall).
//!
//! - apt runs by argv only, through the executor context's process runner
//!   ([`runos_executors::Ctx::run`]): `DEBIAN_FRONTEND=noninteractive`, an explicit conffile
//!   policy (`--force-confdef`, `--force-confold`), a bounded wait for the dpkg lock
//!   (`DPkg::Lock::Timeout`), an inactivity watchdog, the instruction's deadline and
//!   cancellation;
//! - progress comes from apt's machine-readable status lines (`APT::Status-Fd`, [`status`]) and
//!   goes out as `LOG` lines;
//! - package state is read back from the dpkg database with `dpkg-query --showformat`
//!   ([`dpkg`]), never from apt's text; available versions come from `apt-cache show` stanzas
//!   ([`deb822`]) ordered as dpkg orders versions ([`version`]);
//! - a change that apt would make to packages the instruction does not name (a dependent package
//!   removed with the one asked for, a conflicting one removed by an install) is refused before
//!   anything changes: apt's simulation (`apt-get -s`, [`simulate`]) is read first;
//! - what the agent installed is recorded (`installed.json`, 0600, written atomically) for the
//!   uninstall ([`Apt::recorded`]).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod apt;
pub mod deb822;
pub mod dpkg;
mod record;
pub mod simulate;
pub mod status;
mod uninstall;
pub mod version;

pub use apt::{Apt, MAX_LOCK_TIMEOUT, Settings, TAIL_BYTES, TAIL_LINES};
pub use record::FILE as RECORD_FILE;
pub use runos_protocol::instructions::{
    GetPackages, InstallPackages, PackageName, PackageSpec, PackageState, PackagesReply,
    RemovePackages,
};
pub use uninstall::UninstallPackages;
