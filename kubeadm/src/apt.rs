//! [`PackageOps`] on the package executor's code (`runos_packages::Apt`): the upgrade's package
//! steps are the same argv-only apt-get / apt-mark / dpkg-query runs as `INSTALL_PACKAGES`, with
//! their lock timeout, watchdog and state read back from the dpkg database.

use runos_executors::Ctx;
use runos_packages::Apt;
use runos_protocol::instructions::{InstallPackages, PackageSpec};

use crate::upgrade::{OpFuture, PackageInfo, PackageOps};

impl PackageOps for Apt {
    fn query<'a>(&'a self, ctx: &'a Ctx, names: &'a [String]) -> OpFuture<'a, Vec<PackageInfo>> {
        Box::pin(async move {
            let states = Apt::query(self, ctx, names).await.map_err(|e| e.message)?;
            Ok(states
                .into_iter()
                .map(|s| PackageInfo {
                    version: (s.status == "installed" && !s.version.is_empty())
                        .then_some(s.version),
                    name: s.name,
                    held: s.held,
                })
                .collect())
        })
    }

    fn set_hold<'a>(&'a self, ctx: &'a Ctx, names: &'a [String], hold: bool) -> OpFuture<'a, ()> {
        Box::pin(async move {
            Apt::set_hold(self, ctx, names, hold)
                .await
                .map_err(|e| e.message)
        })
    }

    fn install_exact<'a>(
        &'a self,
        ctx: &'a Ctx,
        name: &'a str,
        debian_version: &'a str,
    ) -> OpFuture<'a, ()> {
        Box::pin(async move {
            let req = InstallPackages {
                packages: vec![PackageSpec {
                    name: name.to_string(),
                    version: Some(debian_version.to_string()),
                }],
                hold: false,
                unhold: false,
                update_index: false,
            };
            Apt::install(self, ctx, req)
                .await
                .map(|_| ())
                .map_err(|e| e.message)
        })
    }

    fn resolve_version<'a>(
        &'a self,
        ctx: &'a Ctx,
        name: &'a str,
        upstream: &'a str,
    ) -> OpFuture<'a, String> {
        Box::pin(async move {
            Apt::resolve_version(self, ctx, name, upstream)
                .await
                .map_err(|e| e.message)
        })
    }

    /// `apt-get update` (the repositories are reachable now), then a downloadable `name`.
    fn check_repository<'a>(&'a self, ctx: &'a Ctx, name: &'a str) -> OpFuture<'a, ()> {
        Box::pin(async move {
            Apt::update_index(self, ctx).await.map_err(|e| e.message)?;
            Apt::check_repository(self, ctx, name)
                .await
                .map_err(|e| e.message)
        })
    }
}
