//! The in-toto statement inside the DSSE envelope, read strictly for the checks
//! `sigstore-verify` leaves to us: statement type, predicate type, subject name and digest.

use serde::Deserialize;

use crate::error::AttestError;
use crate::{IN_TOTO_STATEMENT_V1, SLSA_PROVENANCE_V1, sanitize};
use runos_checksums::Digest;

/// The fields we check. Unknown fields (the predicate) are skipped; a field given twice is an
/// error, as in sigstore-verify's own parse of the same bytes.
#[derive(Deserialize)]
struct Statement {
    #[serde(rename = "_type")]
    type_: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
}

#[derive(Deserialize)]
struct Subject {
    #[serde(default)]
    name: String,
    digest: SubjectDigest,
}

#[derive(Deserialize)]
struct SubjectDigest {
    #[serde(default)]
    sha256: Option<String>,
}

/// Checks the statement in `payload`: in-toto v1, SLSA provenance v1, exactly one subject
/// named `asset_name`, and that subject's sha256 is `artifact`. Returns the predicate type.
pub(crate) fn check(
    payload: &[u8],
    asset_name: &str,
    artifact: &Digest,
) -> Result<&'static str, AttestError> {
    let statement: Statement = serde_json::from_slice(payload)
        .map_err(|e| AttestError::Statement(sanitize(&e.to_string(), 200)))?;
    if statement.type_ != IN_TOTO_STATEMENT_V1 {
        return Err(AttestError::Statement(format!(
            "statement type is {}: expected {IN_TOTO_STATEMENT_V1}",
            sanitize(&statement.type_, 120)
        )));
    }
    if statement.predicate_type != SLSA_PROVENANCE_V1 {
        return Err(AttestError::PredicateType {
            actual: sanitize(&statement.predicate_type, 120),
            expected: SLSA_PROVENANCE_V1,
        });
    }
    let mut named = statement.subject.iter().filter(|s| s.name == asset_name);
    let (Some(subject), None) = (named.next(), named.next()) else {
        let count = statement
            .subject
            .iter()
            .filter(|s| s.name == asset_name)
            .count();
        if count == 0 {
            return Err(AttestError::SubjectNotFound {
                asset_name: asset_name.to_string(),
                subjects: subject_names(&statement.subject),
            });
        }
        return Err(AttestError::SubjectAmbiguous {
            asset_name: asset_name.to_string(),
            count,
        });
    };
    let attested = subject
        .digest
        .sha256
        .as_deref()
        .and_then(|hex| hex.parse::<Digest>().ok());
    match attested {
        Some(d) if d == *artifact => Ok(SLSA_PROVENANCE_V1),
        _ => Err(AttestError::SubjectDigestMismatch {
            asset_name: asset_name.to_string(),
            attested: subject
                .digest
                .sha256
                .as_deref()
                .map_or_else(|| "none".to_string(), |s| sanitize(s, 80)),
            actual: *artifact,
        }),
    }
}

/// The first few subject names, sanitised, for an error message.
fn subject_names(subjects: &[Subject]) -> String {
    const SHOWN: usize = 5;
    let mut names: Vec<String> = subjects
        .iter()
        .take(SHOWN)
        .map(|s| sanitize(&s.name, 80))
        .collect();
    if subjects.len() > SHOWN {
        names.push(format!("and {} more", subjects.len() - SHOWN));
    }
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a0cfc71271d6e278e57cd332ff957c3f7043fdda354c4cbb190a30d56efa01bf";
    const B: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn statement(type_: &str, predicate: &str, subjects: &str) -> Vec<u8> {
        format!(
            r#"{{"_type":"{type_}","subject":{subjects},"predicateType":"{predicate}","predicate":{{"x":[1,2,{{"y":null}}]}}}}"#
        )
        .into_bytes()
    }

    fn ok(subjects: &str) -> Vec<u8> {
        statement(IN_TOTO_STATEMENT_V1, SLSA_PROVENANCE_V1, subjects)
    }

    fn a() -> Digest {
        A.parse().unwrap()
    }

    #[test]
    fn accepts_the_named_subject_with_the_digest() {
        let subjects = format!(
            r#"[{{"name":"other","digest":{{"sha256":"{B}"}}}},{{"name":"a.txt","digest":{{"sha256":"{}","sha512":"00"}}}}]"#,
            A.to_uppercase()
        );
        assert_eq!(check(&ok(&subjects), "a.txt", &a()), Ok(SLSA_PROVENANCE_V1));
    }

    #[test]
    fn rejects_wrong_types() {
        let subjects = format!(r#"[{{"name":"a.txt","digest":{{"sha256":"{A}"}}}}]"#);
        let e = check(
            &statement(
                "https://in-toto.io/Statement/v0.1",
                SLSA_PROVENANCE_V1,
                &subjects,
            ),
            "a.txt",
            &a(),
        );
        assert!(matches!(e, Err(AttestError::Statement(_))), "{e:?}");
        let e = check(
            &statement(
                IN_TOTO_STATEMENT_V1,
                "https://slsa.dev/provenance/v0.2",
                &subjects,
            ),
            "a.txt",
            &a(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "attestation predicate type is https://slsa.dev/provenance/v0.2: expected https://slsa.dev/provenance/v1"
        );
    }

    #[test]
    fn subject_rules() {
        let e = check(
            &ok(&format!(
                r#"[{{"name":"b.txt","digest":{{"sha256":"{A}"}}}}]"#
            )),
            "a.txt",
            &a(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            AttestError::SubjectNotFound {
                asset_name: "a.txt".into(),
                subjects: "b.txt".into()
            }
        );
        let e = check(
            &ok(&format!(
                r#"[{{"name":"a.txt","digest":{{"sha256":"{A}"}}}},{{"name":"a.txt","digest":{{"sha256":"{A}"}}}}]"#
            )),
            "a.txt",
            &a(),
        )
        .unwrap_err();
        assert!(
            matches!(e, AttestError::SubjectAmbiguous { count: 2, .. }),
            "{e:?}"
        );
        let e = check(
            &ok(&format!(
                r#"[{{"name":"a.txt","digest":{{"sha256":"{B}"}}}}]"#
            )),
            "a.txt",
            &a(),
        )
        .unwrap_err();
        assert!(
            matches!(e, AttestError::SubjectDigestMismatch { .. }),
            "{e:?}"
        );
        let e = check(
            &ok(r#"[{"name":"a.txt","digest":{"sha512":"00"}}]"#),
            "a.txt",
            &a(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, AttestError::SubjectDigestMismatch { attested, .. } if attested == "none"),
            "{e:?}"
        );
        let e = check(&ok("[]"), "a.txt", &a()).unwrap_err();
        assert!(
            matches!(&e, AttestError::SubjectNotFound { subjects, .. } if subjects == "none"),
            "{e:?}"
        );
        let many: Vec<String> = (0..8)
            .map(|i| format!(r#"{{"name":"n{i}","digest":{{"sha256":"{B}"}}}}"#))
            .collect();
        let e = check(&ok(&format!("[{}]", many.join(","))), "a.txt", &a()).unwrap_err();
        assert!(
            e.to_string().contains("n0, n1, n2, n3, n4, and 3 more"),
            "{e}"
        );
    }

    #[test]
    fn malformed_statements() {
        for bad in [
            &b""[..],
            b"null",
            b"{}",
            b"[1]",
            br#"{"_type":"https://in-toto.io/Statement/v1","subject":[],"predicateType":"p","predicateType":"p"}"#,
            br#"{"_type":"https://in-toto.io/Statement/v1","subject":[{"name":"a","digest":{"sha256":"x","sha256":"y"}}],"predicateType":"p"}"#,
            br#"{"_type":"https://in-toto.io/Statement/v1","subject":{},"predicateType":"p"}"#,
        ] {
            assert!(
                matches!(check(bad, "a", &a()), Err(AttestError::Statement(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
