//! The package side of `UNINSTALL_NODE` ([`runos_executors::uninstall::Packages`]): the
//! packages this agent recorded as installed by itself that dpkg still has, purged through the
//! apt executor (holds released first).

use std::sync::Arc;

use runos_executors::Ctx;
use runos_executors::handle::BoxFuture;
use runos_protocol::ErrorPayload;
use runos_protocol::instructions::{PackageName, RemovePackages};

use crate::Apt;

/// [`Apt`] as the uninstall's packages.
#[derive(Debug, Clone)]
pub struct UninstallPackages(pub Arc<Apt>);

impl runos_executors::uninstall::Packages for UninstallPackages {
    fn recorded(&self, ctx: Ctx) -> BoxFuture<Result<Vec<String>, ErrorPayload>> {
        let apt = self.0.clone();
        Box::pin(async move {
            let names = apt.recorded()?;
            if names.is_empty() {
                return Ok(names);
            }
            // Only those dpkg still has (installed, or their configuration files).
            let states = apt.query(&ctx, &names).await?;
            Ok(states
                .into_iter()
                .filter(|s| s.status != "not-installed")
                .map(|s| s.name)
                .collect())
        })
    }

    fn purge(&self, ctx: Ctx, names: Vec<String>) -> BoxFuture<Result<(), ErrorPayload>> {
        let apt = self.0.clone();
        Box::pin(async move {
            let req = RemovePackages {
                packages: names.into_iter().map(|name| PackageName { name }).collect(),
                purge: true,
                unhold: true,
            };
            apt.remove(&ctx, req).await.map(drop)
        })
    }
}
