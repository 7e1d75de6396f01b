//! What a release attestation must say: the [`Policy`].

use runos_checksums::validate_name;

use crate::error::PolicyError;
use crate::sanitize;

/// The workflow that attests runos releases.
pub const DEFAULT_WORKFLOW: &str = ".github/workflows/release.yml";

/// Longest git ref accepted, in bytes.
const MAX_GIT_REF: usize = 255;

/// Who must have attested an asset, and under which name.
///
/// Built with [`Policy::for_release`] (the updater's case) or [`Policy::new`]; every field is
/// validated there, so a `Policy` value is always well formed. Comparisons in [`verify`] are
/// exact and case-sensitive: `repo` must be spelt as GitHub spells it (the certificate carries
/// the canonical spelling).
///
/// [`verify`]: crate::verify
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    repo: String,
    workflow: String,
    git_ref: String,
    asset_name: String,
    require_github_hosted: bool,
    repository_id: Option<String>,
}

impl Policy {
    /// The policy for a runos release: `repo` (`owner/name`), the release tag (`v0.24.0`,
    /// `v1.0.0-rc.1`), the asset's file name; workflow [`DEFAULT_WORKFLOW`], git ref
    /// `refs/tags/<tag>`, GitHub-hosted runner required.
    ///
    /// The tag must be `vMAJOR.MINOR.PATCH` exactly (decimal, no leading zeros), optionally
    /// followed by a semver pre-release (`-rc.1`, `-beta.2`: dot-separated identifiers of
    /// letters, digits and `-`, numeric ones without leading zeros). Build metadata (`+…`)
    /// is refused. Pre-releases are accepted here because the attestation binds whatever tag
    /// is being installed exactly; whether to install a pre-release at all is the updater's
    /// decision, not this check's.
    pub fn for_release(repo: &str, tag: &str, asset_name: &str) -> Result<Self, PolicyError> {
        validate_release_tag(tag)?;
        Self::new(
            repo,
            DEFAULT_WORKFLOW,
            &format!("refs/tags/{tag}"),
            asset_name,
        )
    }

    /// A policy for any workflow and ref (tests, other release layouts). GitHub-hosted runner
    /// required; see [`Policy::with_require_github_hosted`].
    pub fn new(
        repo: &str,
        workflow: &str,
        git_ref: &str,
        asset_name: &str,
    ) -> Result<Self, PolicyError> {
        validate_repo(repo)?;
        validate_workflow(workflow)?;
        validate_git_ref(git_ref)?;
        validate_name(asset_name).map_err(|reason| PolicyError::AssetName {
            name: sanitize(asset_name, 64),
            reason,
        })?;
        Ok(Self {
            repo: repo.to_string(),
            workflow: workflow.to_string(),
            git_ref: git_ref.to_string(),
            asset_name: asset_name.to_string(),
            require_github_hosted: true,
            repository_id: None,
        })
    }

    /// Whether the certificate must say the workflow ran on a GitHub-hosted runner (the
    /// default). A self-hosted runner is controlled by whoever administers it, so its
    /// attestation proves less.
    pub fn with_require_github_hosted(mut self, required: bool) -> Self {
        self.require_github_hosted = required;
        self
    }

    /// Also require the repository's immutable numeric id (certificate claim
    /// `source_repository_identifier`). Unlike the name, the id survives renames and does not
    /// carry over to a repository re-created under the same name.
    pub fn with_repository_id(mut self, id: &str) -> Result<Self, PolicyError> {
        if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PolicyError::RepositoryId(sanitize(id, 32)));
        }
        self.repository_id = Some(id.to_string());
        Ok(self)
    }

    /// `owner/name`.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// The workflow path, e.g. `.github/workflows/release.yml`.
    pub fn workflow(&self) -> &str {
        &self.workflow
    }

    /// The git ref, e.g. `refs/tags/v0.24.0`.
    pub fn git_ref(&self) -> &str {
        &self.git_ref
    }

    /// The asset's file name, which must be the attestation subject's name.
    pub fn asset_name(&self) -> &str {
        &self.asset_name
    }

    /// Whether a GitHub-hosted runner is required.
    pub fn requires_github_hosted(&self) -> bool {
        self.require_github_hosted
    }

    /// The repository id required, if any.
    pub fn repository_id(&self) -> Option<&str> {
        self.repository_id.as_deref()
    }

    /// The certificate identity (URI SAN) required:
    /// `https://github.com/<repo>/<workflow>@<git_ref>`.
    pub fn expected_identity(&self) -> String {
        format!(
            "https://github.com/{}/{}@{}",
            self.repo, self.workflow, self.git_ref
        )
    }

    /// The source repository URI required: `https://github.com/<repo>`.
    pub fn expected_repository_uri(&self) -> String {
        format!("https://github.com/{}", self.repo)
    }
}

fn validate_repo(repo: &str) -> Result<(), PolicyError> {
    let bad = || PolicyError::Repo(sanitize(repo, 160));
    let (owner, name) = repo.split_once('/').ok_or_else(bad)?;
    let owner_ok = (1..=39).contains(&owner.len())
        && !owner.starts_with('-')
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let name_ok = (1..=100).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if owner_ok && name_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

fn validate_workflow(workflow: &str) -> Result<(), PolicyError> {
    let bad = || PolicyError::Workflow(sanitize(workflow, 160));
    let file = workflow
        .strip_prefix(".github/workflows/")
        .ok_or_else(bad)?;
    let stem = file
        .strip_suffix(".yml")
        .or_else(|| file.strip_suffix(".yaml"))
        .ok_or_else(bad)?;
    let ok = !stem.is_empty()
        && file.len() <= 100
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok { Ok(()) } else { Err(bad()) }
}

fn validate_git_ref(git_ref: &str) -> Result<(), PolicyError> {
    let ok = git_ref.len() <= MAX_GIT_REF
        && git_ref
            .strip_prefix("refs/")
            .is_some_and(|rest| !rest.is_empty())
        && git_ref.bytes().all(|b| b.is_ascii_graphic())
        && !git_ref.contains("..")
        && !git_ref.ends_with('/');
    if ok {
        Ok(())
    } else {
        Err(PolicyError::GitRef(sanitize(git_ref, 160)))
    }
}

/// `vMAJOR.MINOR.PATCH[-PRERELEASE]`, semver 2.0 numbers and pre-release identifiers.
fn validate_release_tag(tag: &str) -> Result<(), PolicyError> {
    let bad = || PolicyError::Tag(sanitize(tag, 64));
    if tag.len() > 128 {
        return Err(bad());
    }
    let version = tag.strip_prefix('v').ok_or_else(bad)?;
    let (core, pre) = match version.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (version, None),
    };
    let mut parts = 0;
    for part in core.split('.') {
        parts += 1;
        if !is_numeric_identifier(part) {
            return Err(bad());
        }
    }
    if parts != 3 {
        return Err(bad());
    }
    if let Some(pre) = pre {
        for ident in pre.split('.') {
            let ok = !ident.is_empty()
                && ident
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && (!ident.bytes().all(|b| b.is_ascii_digit()) || is_numeric_identifier(ident));
            if !ok {
                return Err(bad());
            }
        }
    }
    Ok(())
}

/// A semver numeric identifier: digits, no leading zero (except `0` itself), fits in u64.
fn is_numeric_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'))
        && s.parse::<u64>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_release_builds_the_release_identity() {
        let p = Policy::for_release("runos-dev/runos", "v0.24.0", "runos_linux_amd64").unwrap();
        assert_eq!(
            p.expected_identity(),
            "https://github.com/runos-dev/runos/.github/workflows/release.yml@refs/tags/v0.24.0"
        );
        assert_eq!(
            p.expected_repository_uri(),
            "https://github.com/runos-dev/runos"
        );
        assert_eq!(p.git_ref(), "refs/tags/v0.24.0");
        assert_eq!(p.workflow(), DEFAULT_WORKFLOW);
        assert_eq!(p.asset_name(), "runos_linux_amd64");
        assert!(p.requires_github_hosted());
        assert_eq!(p.repository_id(), None);
        assert!(
            !p.clone()
                .with_require_github_hosted(false)
                .requires_github_hosted()
        );
        let p = p.with_repository_id("123456789").unwrap();
        assert_eq!(p.repository_id(), Some("123456789"));
    }

    #[test]
    fn release_tags() {
        for ok in [
            "v0.0.0",
            "v0.24.0",
            "v1.2.3",
            "v10.20.30",
            "v1.0.0-rc.1",
            "v1.0.0-alpha",
            "v1.0.0-alpha-1.0",
            "v1.0.0-0.3.7",
            "v1.0.0-x.7.z.92",
        ] {
            assert_eq!(validate_release_tag(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "v",
            "0.24.0",
            "V0.24.0",
            "v0.24",
            "v0.24.0.1",
            "v01.2.3",
            "v1.02.3",
            "v1.2.03",
            "v1.2.3-",
            "v1.2.3-rc..1",
            "v1.2.3-rc.01",
            "v1.2.3+build",
            "v1.2.3-rc+build",
            "v1.2.3 ",
            " v1.2.3",
            "v1.2.3\n",
            "v1.2.3-rc/1",
            "v1.2.-3",
            "v99999999999999999999.0.0",
            "v1.2.3-é",
            "refs/tags/v1.2.3",
        ] {
            assert!(
                matches!(validate_release_tag(bad), Err(PolicyError::Tag(_))),
                "{bad:?}"
            );
            assert!(Policy::for_release("a/b", bad, "x").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repositories() {
        for ok in [
            "a/b",
            "runos-dev/runos",
            "sigstore-conformance/extremely-dangerous-public-oidc-beacon",
            "x/.github",
            "x/a_b.c-d",
        ] {
            assert_eq!(validate_repo(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a",
            "/b",
            "a/",
            "a/b/c",
            "-a/b",
            "a_b/c",
            "a/.",
            "a/..",
            "a/b c",
            "a/b\n",
            "https://github.com/a/b",
            &format!("{}/b", "o".repeat(40)),
            &format!("a/{}", "n".repeat(101)),
        ] {
            assert!(
                matches!(validate_repo(bad), Err(PolicyError::Repo(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn workflows() {
        for ok in [
            ".github/workflows/release.yml",
            ".github/workflows/release.yaml",
            ".github/workflows/extremely-dangerous-oidc-beacon.yml",
        ] {
            assert_eq!(validate_workflow(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "release.yml",
            ".github/workflows/.yml",
            ".github/workflows/release",
            ".github/workflows/sub/release.yml",
            ".github/workflows/../x.yml",
            ".github/workflows/release.yml@refs/tags/v1.0.0",
            "/.github/workflows/release.yml",
            ".github/workflows/re lease.yml",
        ] {
            assert!(
                matches!(validate_workflow(bad), Err(PolicyError::Workflow(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn git_refs() {
        for ok in [
            "refs/tags/v1.0.0",
            "refs/heads/main",
            "refs/heads/feature/x",
        ] {
            assert_eq!(validate_git_ref(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "refs/",
            "main",
            "v1.0.0",
            "refs/tags/v1 0",
            "refs/tags/../x",
            "refs/tags/",
            "refs/tags/x\n",
        ] {
            assert!(
                matches!(validate_git_ref(bad), Err(PolicyError::GitRef(_))),
                "{bad:?}"
            );
        }
        let long = format!("refs/tags/{}", "x".repeat(MAX_GIT_REF));
        assert!(validate_git_ref(&long).is_err());
    }

    #[test]
    fn asset_names_and_ids() {
        assert!(matches!(
            Policy::new("a/b", DEFAULT_WORKFLOW, "refs/tags/v1.0.0", "../x"),
            Err(PolicyError::AssetName { .. })
        ));
        assert!(matches!(
            Policy::new("a/b", DEFAULT_WORKFLOW, "refs/tags/v1.0.0", ""),
            Err(PolicyError::AssetName { .. })
        ));
        let p = Policy::new("a/b", DEFAULT_WORKFLOW, "refs/tags/v1.0.0", "x").unwrap();
        for bad in ["", "12a", "-1", "1 ", "123456789012345678901"] {
            assert!(
                matches!(
                    p.clone().with_repository_id(bad),
                    Err(PolicyError::RepositoryId(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn error_messages_are_sanitised() {
        let e = Policy::for_release("a/b", "v1\u{1b}[2J", "x").unwrap_err();
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
    }
}
