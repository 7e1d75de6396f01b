//! DSSE envelopes and in-toto v1 statements, as `actions/attest-build-provenance`
//! produces them.

use serde::Serialize;
use serde_json::{Value, json};

use crate::{AttestOptions, Subject};

/// The DSSE payload type of in-toto statements.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The in-toto statement type.
pub const IN_TOTO_STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
/// The build type GitHub's workflow provenance uses.
pub const GITHUB_WORKFLOW_BUILD_TYPE: &str = "https://actions.github.io/buildtypes/workflow/v1";

/// DSSE v1 pre-authentication encoding:
/// `"DSSEv1" SP len(type) SP type SP len(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The SLSA v1 predicate GitHub writes for a workflow run.
pub(crate) fn github_slsa_predicate(o: &AttestOptions) -> Value {
    json!({
        "buildDefinition": {
            "buildType": GITHUB_WORKFLOW_BUILD_TYPE,
            "externalParameters": {
                "workflow": {
                    "ref": o.git_ref,
                    "repository": o.repository_uri(),
                    "path": o.workflow_path,
                }
            },
            "internalParameters": {
                "github": {
                    "event_name": o.event_name,
                    "repository_id": o.repository_id,
                    "repository_owner_id": o.repository_owner_id,
                    "runner_environment": o.runner_environment,
                }
            },
            "resolvedDependencies": [{
                "uri": format!("git+{}@{}", o.repository_uri(), o.git_ref),
                "digest": { "gitCommit": o.commit_sha },
            }],
        },
        "runDetails": {
            "builder": { "id": o.san() },
            "metadata": { "invocationId": o.run_invocation_uri() },
        },
    })
}

/// The in-toto v1 statement, serialized compactly with its fields in the
/// order GitHub's signer writes them.
pub(crate) fn statement(subjects: &[Subject], o: &AttestOptions) -> serde_json::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Digest<'a> {
        sha256: &'a str,
    }
    #[derive(Serialize)]
    struct Subj<'a> {
        name: &'a str,
        digest: Digest<'a>,
    }
    #[derive(Serialize)]
    struct Statement<'a> {
        #[serde(rename = "_type")]
        kind: &'static str,
        subject: Vec<Subj<'a>>,
        #[serde(rename = "predicateType")]
        predicate_type: &'a str,
        predicate: Value,
    }
    let hexes: Vec<String> = subjects.iter().map(|s| hex::encode(s.sha256)).collect();
    serde_json::to_vec(&Statement {
        kind: IN_TOTO_STATEMENT_V1,
        subject: subjects
            .iter()
            .zip(&hexes)
            .map(|(s, h)| Subj {
                name: &s.name,
                digest: Digest { sha256: h },
            })
            .collect(),
        predicate_type: &o.predicate_type,
        predicate: o
            .predicate
            .clone()
            .unwrap_or_else(|| github_slsa_predicate(o)),
    })
}
