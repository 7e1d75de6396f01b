//! # runos-testsign — TEST-ONLY fake Sigstore world
//!
//! **This crate exists only for tests. It must never become a dependency
//! (normal or build) of `runos-agent` or of anything shipped in a release.**
//! Release builds accept only the configured real trust roots (the embedded
//! public-good `trusted_root.json`, or one named in root-owned configuration);
//! anything that can mint a trust root and signatures for it belongs in
//! `[dev-dependencies]` or in test binaries, nowhere else.
//!
//! It mints a complete, self-consistent Sigstore "world" so end-to-end tests of
//! the self-updater can produce release attestations that verify under the
//! unmodified `sigstore-verify` crate, given this world's `trusted_root.json`:
//!
//! * a Fulcio-like CA (ECDSA P-384 root and intermediate, as Fulcio's);
//! * a Rekor-v1-like log (ECDSA P-256 key, log ID = SHA-256 of its DER SPKI);
//! * a CT log (ECDSA P-256) that signs precertificates (RFC 6962 SCTs).
//!
//! [`World::attest`] then produces the same bundle `actions/attest-build-provenance`
//! produces: a Sigstore bundle v0.3 with a DSSE envelope over an in-toto v1
//! statement (SLSA v1 predicate), a short-lived leaf certificate carrying the
//! GitHub Actions Fulcio claims and an embedded SCT, and a Rekor `dsse` 0.0.1
//! entry with a signed entry timestamp, an inclusion proof and a signed
//! checkpoint.
//!
//! ```no_run
//! use runos_testsign::{AttestOptions, World};
//! let world = World::generate()?;
//! let opts = AttestOptions::new("runos-dev/runos", "refs/tags/v1.2.3");
//! let bundle_json = world.attest(b"binary", "runos-linux-amd64", &opts)?;
//! let trusted_root_json = world.trusted_root_json();
//! // Verify with sigstore_verify::verify(..., &VerificationPolicy::new(opts.san(), &opts.issuer), ...)
//! # Ok::<(), anyhow::Error>(())
//! ```

mod ct;
pub mod dsse;
mod keys;
mod rekor;
mod x509;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, ensure};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::keys::EcKey;
use crate::x509::{Cert, FulcioClaim, FulcioEncoding, LeafProfile};

/// Media type of the bundles [`World::attest`] produces.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// Media type of [`World::trusted_root_json`].
pub const TRUSTED_ROOT_MEDIA_TYPE: &str =
    "application/vnd.dev.sigstore.trustedroot+json;version=0.1";
/// The GitHub Actions OIDC issuer.
pub const GITHUB_ACTIONS_ISSUER: &str = "https://token.actions.githubusercontent.com";
/// The SLSA provenance v1 predicate type.
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";
/// The workflow path [`AttestOptions::new`] assumes.
pub const DEFAULT_WORKFLOW_PATH: &str = ".github/workflows/release.yml";

/// Host names of this world's services. `.invalid` (RFC 2606): never resolvable.
const FULCIO_URL: &str = "https://fulcio.runos-testsign.invalid";
const REKOR_HOST: &str = "rekor.runos-testsign.invalid";
const CT_URL: &str = "https://ctfe.runos-testsign.invalid/test";
const ROOT_NAME: &str = "CN=runos-testsign-root,O=runos-testsign (TEST ONLY)";
const INTERMEDIATE_NAME: &str = "CN=runos-testsign-intermediate,O=runos-testsign (TEST ONLY)";
/// Entries get this global log index offset over their index in the tree, as
/// in sharded Rekor, where `logIndex` ≠ `inclusionProof.logIndex`.
const SHARD_OFFSET: u64 = 100_000;
/// Filler leaves before the first entry, and after each entry, in its tree.
const LEAVES_BEFORE: u64 = 4;
const LEAVES_AFTER: u64 = 2;
/// Leaf certificate lifetime, as Fulcio's.
const LEAF_LIFETIME: Duration = Duration::minutes(10);

const WORLD_FILE: &str = "world.json";
const TRUSTED_ROOT_FILE: &str = "trusted_root.json";
const ROOT_CERT_FILE: &str = "fulcio-root.pem";
const ROOT_KEY_FILE: &str = "fulcio-root.key.pem";
const INTERMEDIATE_CERT_FILE: &str = "fulcio-intermediate.pem";
const INTERMEDIATE_KEY_FILE: &str = "fulcio-intermediate.key.pem";
const REKOR_KEY_FILE: &str = "rekor.key.pem";
const CT_KEY_FILE: &str = "ctlog.key.pem";
const WORLD_FORMAT: &str = "runos-testsign-world/1";

/// One in-toto subject: an artifact name and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub name: String,
    pub sha256: [u8; 32],
}

impl Subject {
    /// A subject for `artifact`'s bytes.
    pub fn of(name: impl Into<String>, artifact: &[u8]) -> Self {
        Self {
            name: name.into(),
            sha256: Sha256::digest(artifact).into(),
        }
    }

    /// A subject for a known SHA-256.
    pub fn from_digest(name: impl Into<String>, sha256: [u8; 32]) -> Self {
        Self {
            name: name.into(),
            sha256,
        }
    }
}

/// Validity of a world's CA, log keys and trust-root `validFor` windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldOptions {
    pub valid_from: OffsetDateTime,
    pub valid_until: OffsetDateTime,
}

impl Default for WorldOptions {
    /// From one day ago to ten years from now.
    fn default() -> Self {
        let now = now_seconds();
        Self {
            valid_from: now - Duration::days(1),
            valid_until: now + Duration::days(3653),
        }
    }
}

/// The identity and build facts of one simulated `attest-build-provenance`
/// run. [`AttestOptions::new`] fills in GitHub-like defaults; override fields
/// with struct update syntax.
#[derive(Debug, Clone, PartialEq)]
pub struct AttestOptions {
    /// `owner/name`.
    pub repo: String,
    /// Default [`DEFAULT_WORKFLOW_PATH`].
    pub workflow_path: String,
    /// e.g. `refs/tags/v1.2.3`.
    pub git_ref: String,
    /// 40 hex digits; default derived from `repo` and `git_ref`.
    pub commit_sha: String,
    /// `.1.11`; default `github-hosted`.
    pub runner_environment: String,
    /// `.1.8` (and legacy `.1.1`); default [`GITHUB_ACTIONS_ISSUER`].
    pub issuer: String,
    /// Default [`SLSA_PROVENANCE_V1`].
    pub predicate_type: String,
    /// Replaces the generated SLSA v1 predicate when set.
    pub predicate: Option<serde_json::Value>,
    /// `.1.20` and `.1.2`; default `push`.
    pub event_name: String,
    /// `.1.4`; default `Release`.
    pub workflow_name: String,
    /// `.1.15`; default `123456789`.
    pub repository_id: String,
    /// `.1.17`; default `987654321`.
    pub repository_owner_id: String,
    /// `.1.22`; default `public`.
    pub repository_visibility: String,
    pub run_id: u64,
    pub run_attempt: u32,
    /// When the leaf certificate is issued (its notBefore and the SCT time);
    /// the log integrates the entry two seconds later. Default: ten seconds
    /// ago. Verification needs the integrated time in the past, inside the
    /// world's validity; setting it elsewhere makes deliberately bad bundles.
    pub signed_at: Option<OffsetDateTime>,
}

impl AttestOptions {
    /// GitHub-like defaults for a release workflow run of `repo`
    /// (`owner/name`) at `git_ref` (e.g. `refs/tags/v1.2.3`).
    pub fn new(repo: impl Into<String>, git_ref: impl Into<String>) -> Self {
        let repo = repo.into();
        let git_ref = git_ref.into();
        let commit_sha = hex::encode(&Sha256::digest(format!("{repo}@{git_ref}"))[..20]);
        Self {
            repo,
            workflow_path: DEFAULT_WORKFLOW_PATH.to_string(),
            git_ref,
            commit_sha,
            runner_environment: "github-hosted".to_string(),
            issuer: GITHUB_ACTIONS_ISSUER.to_string(),
            predicate_type: SLSA_PROVENANCE_V1.to_string(),
            predicate: None,
            event_name: "push".to_string(),
            workflow_name: "Release".to_string(),
            repository_id: "123456789".to_string(),
            repository_owner_id: "987654321".to_string(),
            repository_visibility: "public".to_string(),
            run_id: 4_242_424_242,
            run_attempt: 1,
            signed_at: None,
        }
    }

    /// The certificate SAN (and `.1.9` build signer URI):
    /// `https://github.com/<repo>/<workflow_path>@<git_ref>`.
    pub fn san(&self) -> String {
        format!(
            "https://github.com/{}/{}@{}",
            self.repo, self.workflow_path, self.git_ref
        )
    }

    /// `.1.12`: `https://github.com/<repo>`.
    pub fn repository_uri(&self) -> String {
        format!("https://github.com/{}", self.repo)
    }

    /// `.1.16`: `https://github.com/<owner>`.
    pub fn owner_uri(&self) -> String {
        let owner = self.repo.split('/').next().unwrap_or_default();
        format!("https://github.com/{owner}")
    }

    /// `.1.21`: the workflow run attempt URL.
    pub fn run_invocation_uri(&self) -> String {
        format!(
            "{}/actions/runs/{}/attempts/{}",
            self.repository_uri(),
            self.run_id,
            self.run_attempt
        )
    }

    /// The Fulcio claims, in the order and encoding Fulcio writes them for a
    /// GitHub Actions token.
    fn claims(&self) -> Vec<FulcioClaim> {
        use FulcioEncoding::{Raw, Utf8String};
        let san = self.san();
        [
            (1, Raw, self.issuer.clone()),
            (2, Raw, self.event_name.clone()),
            (3, Raw, self.commit_sha.clone()),
            (4, Raw, self.workflow_name.clone()),
            (5, Raw, self.repo.clone()),
            (6, Raw, self.git_ref.clone()),
            (8, Utf8String, self.issuer.clone()),
            (9, Utf8String, san.clone()),
            (10, Utf8String, self.commit_sha.clone()),
            (11, Utf8String, self.runner_environment.clone()),
            (12, Utf8String, self.repository_uri()),
            (13, Utf8String, self.commit_sha.clone()),
            (14, Utf8String, self.git_ref.clone()),
            (15, Utf8String, self.repository_id.clone()),
            (16, Utf8String, self.owner_uri()),
            (17, Utf8String, self.repository_owner_id.clone()),
            (18, Utf8String, san),
            (19, Utf8String, self.commit_sha.clone()),
            (20, Utf8String, self.event_name.clone()),
            (21, Utf8String, self.run_invocation_uri()),
            (22, Utf8String, self.repository_visibility.clone()),
        ]
        .into_iter()
        .map(|(number, encoding, value)| FulcioClaim {
            number,
            encoding,
            value,
        })
        .collect()
    }
}

/// A fake Sigstore instance: CA, transparency log and CT log keys.
/// See the crate documentation; **test use only**.
pub struct World {
    root_key: EcKey,
    root: Cert,
    intermediate_key: EcKey,
    intermediate: Cert,
    rekor_key: EcKey,
    ct_key: EcKey,
    valid_from: OffsetDateTime,
    valid_until: OffsetDateTime,
    rekor_tree_id: u64,
    entries: AtomicU64,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("valid_from", &self.valid_from)
            .field("valid_until", &self.valid_until)
            .field("rekor_log_id", &hex::encode(self.rekor_log_id()))
            .field("ct_log_id", &hex::encode(self.ct_log_id()))
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorldFile {
    format: String,
    valid_from: String,
    valid_until: String,
    rekor_tree_id: u64,
}

fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn rfc3339(t: OffsetDateTime) -> Result<String> {
    Ok(t.format(&Rfc3339)?)
}

impl World {
    /// A new world valid from one day ago to ten years from now.
    pub fn generate() -> Result<Self> {
        Self::generate_with(WorldOptions::default())
    }

    /// A new world with the given validity.
    pub fn generate_with(opts: WorldOptions) -> Result<Self> {
        ensure!(opts.valid_from < opts.valid_until, "empty validity window");
        let valid_from = opts.valid_from.replace_nanosecond(0)?;
        let valid_until = opts.valid_until.replace_nanosecond(0)?;
        let root_key = EcKey::generate_p384()?;
        let root = x509::ca_certificate(
            &root_key,
            x509::parse_name(ROOT_NAME)?,
            None,
            1,
            valid_from,
            valid_until,
        )?;
        let intermediate_key = EcKey::generate_p384()?;
        let intermediate = x509::ca_certificate(
            &intermediate_key,
            x509::parse_name(INTERMEDIATE_NAME)?,
            Some((&root, &root_key)),
            0,
            valid_from,
            valid_until,
        )?;
        Ok(Self {
            root_key,
            root,
            intermediate_key,
            intermediate,
            rekor_key: EcKey::generate_p256()?,
            ct_key: EcKey::generate_p256()?,
            valid_from,
            valid_until,
            rekor_tree_id: rand::random::<u64>() >> 1,
            entries: AtomicU64::new(0),
        })
    }

    /// Start of the validity of everything in this world.
    pub fn valid_from(&self) -> OffsetDateTime {
        self.valid_from
    }

    /// End of the validity of everything in this world.
    pub fn valid_until(&self) -> OffsetDateTime {
        self.valid_until
    }

    /// The Rekor log ID: SHA-256 of the log's DER public key.
    pub fn rekor_log_id(&self) -> [u8; 32] {
        self.rekor_key.key_id()
    }

    /// The CT log ID: SHA-256 of the log's DER public key.
    pub fn ct_log_id(&self) -> [u8; 32] {
        self.ct_key.key_id()
    }

    /// The checkpoint origin line of this world's log.
    pub fn rekor_origin(&self) -> String {
        format!("{REKOR_HOST} - {}", self.rekor_tree_id)
    }

    /// The Fulcio-like root certificate, PEM.
    pub fn fulcio_root_pem(&self) -> Result<String> {
        self.root.to_pem()
    }

    /// The Fulcio-like intermediate certificate, PEM.
    pub fn fulcio_intermediate_pem(&self) -> Result<String> {
        self.intermediate.to_pem()
    }

    /// This world's Sigstore `trusted_root.json` (TrustedRoot v0.1): one tlog,
    /// one certificate authority (intermediate then root), one CT log, no
    /// timestamp authority; every `validFor` is the world's validity.
    pub fn trusted_root_json(&self) -> String {
        let valid_for = json!({
            "start": rfc3339(self.valid_from).unwrap_or_default(),
            "end": rfc3339(self.valid_until).unwrap_or_default(),
        });
        let log = |url: String, key: &EcKey| {
            json!({
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": B64.encode(key.spki_der()),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": valid_for,
                },
                "logId": { "keyId": B64.encode(key.key_id()) },
            })
        };
        let root = json!({
            "mediaType": TRUSTED_ROOT_MEDIA_TYPE,
            "tlogs": [log(format!("https://{REKOR_HOST}"), &self.rekor_key)],
            "certificateAuthorities": [{
                "subject": {
                    "organization": "runos-testsign (TEST ONLY)",
                    "commonName": "runos-testsign-root",
                },
                "uri": FULCIO_URL,
                "certChain": { "certificates": [
                    { "rawBytes": B64.encode(&self.intermediate.der) },
                    { "rawBytes": B64.encode(&self.root.der) },
                ]},
                "validFor": valid_for,
            }],
            "ctlogs": [log(CT_URL.to_string(), &self.ct_key)],
            "timestampAuthorities": [],
        });
        serde_json::to_string_pretty(&root).unwrap_or_default()
    }

    /// Writes the world to `dir` (created if missing): keys and certificates
    /// as PEM, `world.json`, and `trusted_root.json` for convenience.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
        };
        let meta = WorldFile {
            format: WORLD_FORMAT.to_string(),
            valid_from: rfc3339(self.valid_from)?,
            valid_until: rfc3339(self.valid_until)?,
            rekor_tree_id: self.rekor_tree_id,
        };
        write(WORLD_FILE, &serde_json::to_string_pretty(&meta)?)?;
        write(ROOT_CERT_FILE, &self.root.to_pem()?)?;
        write(ROOT_KEY_FILE, &self.root_key.to_pem())?;
        write(INTERMEDIATE_CERT_FILE, &self.intermediate.to_pem()?)?;
        write(INTERMEDIATE_KEY_FILE, &self.intermediate_key.to_pem())?;
        write(REKOR_KEY_FILE, &self.rekor_key.to_pem())?;
        write(CT_KEY_FILE, &self.ct_key.to_pem())?;
        write(TRUSTED_ROOT_FILE, &self.trusted_root_json())?;
        Ok(())
    }

    /// Reads a world written by [`World::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let meta: WorldFile = serde_json::from_str(&read(WORLD_FILE)?).context(WORLD_FILE)?;
        ensure!(
            meta.format == WORLD_FORMAT,
            "{WORLD_FILE}: unknown format {:?}",
            meta.format
        );
        let root_key = EcKey::from_pem(&read(ROOT_KEY_FILE)?).context(ROOT_KEY_FILE)?;
        let root = Cert::from_pem(&read(ROOT_CERT_FILE)?).context(ROOT_CERT_FILE)?;
        let intermediate_key =
            EcKey::from_pem(&read(INTERMEDIATE_KEY_FILE)?).context(INTERMEDIATE_KEY_FILE)?;
        let intermediate =
            Cert::from_pem(&read(INTERMEDIATE_CERT_FILE)?).context(INTERMEDIATE_CERT_FILE)?;
        ensure!(
            root.spki_der()? == root_key.spki_der(),
            "{ROOT_CERT_FILE} does not match {ROOT_KEY_FILE}"
        );
        ensure!(
            intermediate.spki_der()? == intermediate_key.spki_der(),
            "{INTERMEDIATE_CERT_FILE} does not match {INTERMEDIATE_KEY_FILE}"
        );
        ensure!(
            intermediate_key.is_p384() && root_key.is_p384(),
            "CA keys must be P-384"
        );
        let rekor_key = EcKey::from_pem(&read(REKOR_KEY_FILE)?).context(REKOR_KEY_FILE)?;
        let ct_key = EcKey::from_pem(&read(CT_KEY_FILE)?).context(CT_KEY_FILE)?;
        ensure!(
            !rekor_key.is_p384() && !ct_key.is_p384(),
            "log keys must be P-256"
        );
        let parse = |s: &str| {
            OffsetDateTime::parse(s, &Rfc3339).map_err(|e| anyhow!("{WORLD_FILE}: {s:?}: {e}"))
        };
        Ok(Self {
            root_key,
            root,
            intermediate_key,
            intermediate,
            rekor_key,
            ct_key,
            valid_from: parse(&meta.valid_from)?,
            valid_until: parse(&meta.valid_until)?,
            rekor_tree_id: meta.rekor_tree_id,
            entries: AtomicU64::new(0),
        })
    }

    /// Attests `artifact` under the name `subject_name`; returns the bundle
    /// JSON (`application/vnd.dev.sigstore.bundle.v0.3+json`).
    pub fn attest(
        &self,
        artifact: &[u8],
        subject_name: &str,
        opts: &AttestOptions,
    ) -> Result<Vec<u8>> {
        self.attest_subjects(&[Subject::of(subject_name, artifact)], opts)
    }

    /// Attests an artifact known by its SHA-256.
    pub fn attest_digest(
        &self,
        sha256: [u8; 32],
        subject_name: &str,
        opts: &AttestOptions,
    ) -> Result<Vec<u8>> {
        self.attest_subjects(&[Subject::from_digest(subject_name, sha256)], opts)
    }

    /// Attests several subjects in one statement, as `attest-build-provenance`
    /// does with `subject-path` globs or `subject-checksums`.
    pub fn attest_subjects(&self, subjects: &[Subject], opts: &AttestOptions) -> Result<Vec<u8>> {
        ensure!(!subjects.is_empty(), "an attestation needs a subject");
        let issued = match opts.signed_at {
            Some(t) => t.replace_nanosecond(0)?,
            None => now_seconds() - Duration::seconds(10),
        };
        let integrated_time = (issued + Duration::seconds(2)).unix_timestamp();
        let sct_ms = u64::try_from(issued.unix_timestamp())? * 1000 + 250;

        // The ephemeral signing key and its certificate.
        let leaf_key = EcKey::generate_p256()?;
        let leaf = x509::issue_leaf(
            &self.intermediate,
            &self.intermediate_key,
            &self.ct_key,
            &leaf_key,
            &LeafProfile {
                san_uri: opts.san(),
                claims: opts.claims(),
                not_before: issued,
                not_after: issued + LEAF_LIFETIME,
                sct_timestamp_ms: sct_ms,
            },
        )?;

        // The DSSE envelope over the in-toto statement.
        let statement = dsse::statement(subjects, opts)?;
        let signature = leaf_key.sign(&dsse::pae(dsse::IN_TOTO_PAYLOAD_TYPE, &statement))?;
        let envelope = json!({
            "payload": B64.encode(&statement),
            "payloadType": dsse::IN_TOTO_PAYLOAD_TYPE,
            "signatures": [{ "sig": B64.encode(&signature) }],
        });

        // The Rekor entry.
        let body = rekor::dsse_entry_body(
            &serde_json::to_vec(&envelope)?,
            &statement,
            &signature,
            &leaf.to_pem()?,
        )?;
        let tree_index = LEAVES_BEFORE + self.entries.fetch_add(1, Ordering::Relaxed);
        let entry = rekor::log_entry(&rekor::LogEntryRequest {
            log_key: &self.rekor_key,
            origin: &self.rekor_origin(),
            signer_name: REKOR_HOST,
            body: &body,
            integrated_time,
            tree_index,
            later_leaves: LEAVES_AFTER,
            log_index: SHARD_OFFSET + tree_index,
        })?;

        let bundle = json!({
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {
                "tlogEntries": [entry],
                "timestampVerificationData": {},
                "certificate": { "rawBytes": B64.encode(&leaf.der) },
            },
            "dsseEnvelope": envelope,
        });
        Ok(serde_json::to_vec(&bundle)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_the_trusted_root() {
        let dir = tempfile::tempdir().unwrap();
        let world = World::generate().unwrap();
        world.save(dir.path()).unwrap();
        let loaded = World::load(dir.path()).unwrap();
        assert_eq!(world.trusted_root_json(), loaded.trusted_root_json());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(TRUSTED_ROOT_FILE)).unwrap(),
            world.trusted_root_json()
        );
        assert_eq!(world.rekor_origin(), loaded.rekor_origin());
    }

    #[test]
    fn ca_certificates_carry_the_world_validity() {
        let world = World::generate().unwrap();
        assert_eq!(world.root.not_before().unwrap(), world.valid_from);
        assert_eq!(world.intermediate.not_after().unwrap(), world.valid_until);
    }
}
