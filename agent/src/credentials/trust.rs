//! Trust continuity: what a `RENEWED` (or `REGISTERED`) answer may change in the node's trust.
//!
//! The control plane's answer names the CA bundle the node trusts from then on, so a peer that
//! could put any bundle there would own the node. [`admit`] accepts an answer only when it
//! continues the trust the node already has (protocol.md §6.4, docs/certificates.md "Trust
//! continuity"):
//!
//! - the bundle holds one or two distinct CA certificates (basicConstraints `cA = TRUE`);
//! - every CA in it is one the node trusts already, or is **vouched for**: the answer's
//!   cross-certificate (`caCrossPem`) has exactly that CA's subject and key, is itself a CA
//!   certificate valid now, and its signature verifies under a CA the node trusts already;
//! - the certificate is one certificate, not a CA, signed by a CA of the bundle, naming this
//!   node (`runos://node/<id>`) and the key generated on this node, valid now (with
//!   [`CLOCK_SKEW`]) and for a lifetime between [`MIN_LIFETIME`] and [`MAX_LIFETIME`].
//!
//! Anything else is refused with a message that names the rule broken and no peer value.

use std::time::Duration;

use runos_protocol::control;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

/// Most CA certificates in a bundle (protocol.md §4: one, or two during a rotation).
pub const MAX_CA_BUNDLE: usize = 2;
/// Shortest certificate lifetime accepted (the control plane's minimum `--cert-validity`).
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest certificate lifetime accepted: the control plane's longest `--cert-validity` (398
/// days, the CA/Browser Forum's ceiling for TLS certificates) plus its backdating, with room to
/// spare; far above the 30-day default, far below "valid forever".
pub const MAX_LIFETIME: Duration = Duration::from_secs(400 * 86400);
/// How far the clocks may disagree when judging `notBefore` (the control plane backdates its
/// certificates; this covers a node clock that is a little behind).
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// What an admitted answer brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The cross-certificate (PEM), when it vouched for a CA of the bundle under a CA trusted
    /// before: the L1Sec pin may follow that CA ([`crate::credentials::renew::follow_ca`]).
    pub endorsement: Option<String>,
}

/// A certificate parsed once.
struct Parsed<'a> {
    der: &'a [u8],
    cert: X509Certificate<'a>,
}

fn parse(der: &[u8]) -> Result<Parsed<'_>, ()> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(Parsed { der, cert }),
        _ => Err(()),
    }
}

/// Whether the certificate says it is a CA (basicConstraints with `cA = TRUE`).
fn is_ca(c: &X509Certificate<'_>) -> bool {
    matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// Whether `now_s` lies within the validity of `c`, `notBefore` judged with [`CLOCK_SKEW`];
/// `None` (no trusted time) judges nothing.
fn valid_at(c: &X509Certificate<'_>, now_s: Option<i64>) -> bool {
    let Some(now_s) = now_s else {
        return true;
    };
    let v = c.validity();
    let skew = CLOCK_SKEW.as_secs() as i64;
    v.not_before.timestamp() <= now_s.saturating_add(skew) && now_s <= v.not_after.timestamp()
}

/// The DER contents of an AlgorithmIdentifier (OID, then the parameters runos knows: none, a
/// NULL, or a named curve), as `rustls_pki_types::AlgorithmIdentifier` holds them.
fn alg_id_bytes(a: &x509_parser::x509::AlgorithmIdentifier<'_>) -> Option<Vec<u8>> {
    fn oid_tlv(out: &mut Vec<u8>, oid: &x509_parser::der_parser::oid::Oid<'_>) -> Option<()> {
        let b = oid.as_bytes();
        out.push(0x06);
        out.push(u8::try_from(b.len()).ok().filter(|l| *l < 0x80)?);
        out.extend_from_slice(b);
        Some(())
    }
    let mut out = Vec::new();
    oid_tlv(&mut out, &a.algorithm)?;
    match &a.parameters {
        None => {}
        Some(p) if p.tag() == x509_parser::der_parser::asn1_rs::Tag::Null => {
            out.extend_from_slice(&[0x05, 0x00])
        }
        Some(p) => oid_tlv(&mut out, &p.as_oid().ok()?)?,
    }
    Some(out)
}

/// Whether `child` carries `issuer`'s name as its issuer and a signature that verifies under
/// `issuer`'s key (ECDSA, Ed25519 or RSA PKCS#1, as the TLS stack verifies them).
pub fn signed_by(child: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    if child.issuer().as_raw() != issuer.subject().as_raw() {
        return false;
    }
    let (Some(sig_alg), Some(key_alg)) = (
        alg_id_bytes(&child.signature_algorithm),
        alg_id_bytes(&issuer.public_key().algorithm),
    ) else {
        return false;
    };
    let provider = rustls::crypto::ring::default_provider();
    provider
        .signature_verification_algorithms
        .all
        .iter()
        .filter(|a| {
            a.signature_alg_id().as_ref() == sig_alg.as_slice()
                && a.public_key_alg_id().as_ref() == key_alg.as_slice()
        })
        .any(|a| {
            a.verify_signature(
                &issuer.public_key().subject_public_key.data,
                child.tbs_certificate.as_ref(),
                &child.signature_value.data,
            )
            .is_ok()
        })
}

/// Whether the certificate `cross` vouches for the CA `ca` under the CA `issuer`: exactly
/// `ca`'s subject and key, a CA certificate valid at `now_s`, signed by `issuer`.
pub fn vouches(cross: &[u8], ca: &[u8], issuer: &[u8], now_s: Option<i64>) -> bool {
    let (Ok(x), Ok(c), Ok(i)) = (parse(cross), parse(ca), parse(issuer)) else {
        return false;
    };
    vouches_parsed(&x, &c, &i, now_s)
}

fn vouches_parsed(
    x: &Parsed<'_>,
    ca: &Parsed<'_>,
    issuer: &Parsed<'_>,
    now_s: Option<i64>,
) -> bool {
    x.cert.subject().as_raw() == ca.cert.subject().as_raw()
        && x.cert.public_key().raw == ca.cert.public_key().raw
        && is_ca(&x.cert)
        && valid_at(&x.cert, now_s)
        && signed_by(&x.cert, &issuer.cert)
}

/// Judge an answer that replaces the node's credentials: `ca_pem` (the bundle), `cross_pem`
/// (`caCrossPem`) and `cert_pem`, against the CAs the node trusts now (`trusted`, DER), the
/// node id and the public key generated on this node (`public_key`, the SubjectPublicKey bits),
/// at `now_s` (seconds since the epoch, by the clock the agent trusts; `None` at enrolment, when
/// the node has no trusted time yet: validity periods are then left to the control plane).
pub fn admit(
    trusted: &[Vec<u8>],
    ca_pem: &str,
    cross_pem: Option<&str>,
    cert_pem: &str,
    node_id: &str,
    public_key: &[u8],
    now_s: Option<i64>,
) -> Result<Admitted, String> {
    if cert_pem.len() > control::MAX_PEM_LEN
        || ca_pem.len() > control::MAX_PEM_LEN
        || cross_pem.is_some_and(|p| p.len() > control::MAX_PEM_LEN)
    {
        return Err("a PEM field is larger than 64 KiB".into());
    }
    let pems = |text: &str, what: &str| {
        runos_transport::pem::certificates(text.as_bytes())
            .map_err(|_| format!("{what} is not PEM certificates"))
    };
    // The bundle: one or two distinct CA certificates.
    let bundle_der = pems(ca_pem, "the CA bundle")?;
    if bundle_der.is_empty() || bundle_der.len() > MAX_CA_BUNDLE {
        return Err(format!(
            "the CA bundle holds {} certificates (1 to {MAX_CA_BUNDLE} allowed)",
            bundle_der.len()
        ));
    }
    if bundle_der.len() == 2 && bundle_der[0] == bundle_der[1] {
        return Err("the CA bundle holds the same certificate twice".into());
    }
    let mut bundle = Vec::with_capacity(bundle_der.len());
    for d in &bundle_der {
        let p = parse(d).map_err(|_| "a certificate of the CA bundle cannot be parsed")?;
        if !is_ca(&p.cert) {
            return Err("a certificate of the CA bundle is not a CA certificate".into());
        }
        if now_s.is_some_and(|n| p.cert.validity().not_after.timestamp() < n) {
            return Err("a CA of the bundle has expired".into());
        }
        bundle.push(p);
    }
    // The CAs trusted now (the current bundle); an unreadable one vouches for nothing.
    let current: Vec<Parsed<'_>> = trusted.iter().filter_map(|d| parse(d).ok()).collect();
    // The cross-certificate, if any: exactly one certificate.
    let cross_der = match cross_pem {
        Some(p) => {
            let mut v = pems(p, "the CA cross-certificate")?;
            if v.len() != 1 {
                return Err(format!(
                    "the CA cross-certificate field holds {} certificates (1 expected)",
                    v.len()
                ));
            }
            Some(v.remove(0))
        }
        None => None,
    };
    let cross = match &cross_der {
        Some(d) => Some(parse(d).map_err(|_| "the CA cross-certificate cannot be parsed")?),
        None => None,
    };
    // The cross-certificate counts when it vouches, under a CA trusted already, for a CA of
    // the bundle. Every CA of the bundle must be trusted already or vouched for so.
    let vouched_by_cross = |ca: &Parsed<'_>| {
        cross
            .as_ref()
            .is_some_and(|x| current.iter().any(|t| vouches_parsed(x, ca, t, now_s)))
    };
    let mut endorsement = None;
    for ca in &bundle {
        let vouched = vouched_by_cross(ca);
        if vouched {
            endorsement = cross_pem.map(str::to_string);
        }
        if !vouched && !current.iter().any(|t| t.der == ca.der) {
            return Err(
                "the CA bundle holds a CA this node does not trust, and no cross-certificate signed by a trusted CA vouches for it"
                    .into(),
            );
        }
    }
    // The certificate: one, not a CA, from a CA of the bundle, for this node and this key,
    // valid now, with a sane lifetime.
    let leaf_der = pems(cert_pem, "the certificate")?;
    if leaf_der.len() != 1 {
        return Err(format!(
            "the certificate field holds {} certificates (1 expected)",
            leaf_der.len()
        ));
    }
    let leaf = parse(&leaf_der[0]).map_err(|_| "the certificate cannot be parsed")?;
    if is_ca(&leaf.cert) {
        return Err("the certificate is a CA certificate".into());
    }
    let info = runos_transport::identity::cert_info(leaf.der)
        .map_err(|_| "the certificate cannot be parsed")?;
    if info.node_id.as_deref() != Some(node_id) {
        return Err("the certificate does not name this node".into());
    }
    if leaf.cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err("the certificate is not for the key generated on this node".into());
    }
    if !bundle.iter().any(|ca| signed_by(&leaf.cert, &ca.cert)) {
        return Err("the certificate is not signed by a CA of the bundle".into());
    }
    let life = info.not_after.saturating_sub(info.not_before);
    if life < MIN_LIFETIME.as_secs() as i64 || life > MAX_LIFETIME.as_secs() as i64 {
        return Err(format!(
            "the certificate's lifetime is outside {} s to {} days",
            MIN_LIFETIME.as_secs(),
            MAX_LIFETIME.as_secs() / 86400
        ));
    }
    if let Some(now_s) = now_s {
        if now_s > info.not_after {
            return Err("the certificate has expired".into());
        }
        if info.not_before > now_s.saturating_add(CLOCK_SKEW.as_secs() as i64) {
            return Err("the certificate is not valid yet".into());
        }
    }
    Ok(Admitted { endorsement })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };

    const NODE: &str = "6a1f0e0c-0000-4000-8000-000000000001";
    const DAY: i64 = 86400;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn t(s: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(s).unwrap()
    }

    /// A CA: its PEM, DER and issuer (name and key).
    struct Ca {
        pem: String,
        der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca_params(name: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = t(now() - 300);
        p.not_after = t(now() + 3650 * DAY);
        p
    }

    fn ca_with_key(name: &str, key: KeyPair) -> Ca {
        let cert = ca_params(name).self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            issuer: Issuer::new(ca_params(name), key),
        }
    }

    fn ca(name: &str) -> Ca {
        ca_with_key(name, KeyPair::generate().unwrap())
    }

    /// A cross-certificate: `subject`'s name and key, signed by `by`.
    fn cross(subject_name: &str, subject: &Ca, by: &Ca) -> String {
        ca_params(subject_name)
            .signed_by(subject.issuer.key(), &by.issuer)
            .unwrap()
            .pem()
    }

    fn leaf_between(by: &Ca, node: &str, key: &KeyPair, from: i64, to: i64) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, node);
        p.subject_alt_names = vec![SanType::URI(
            format!("runos://node/{node}").try_into().unwrap(),
        )];
        p.not_before = t(from);
        p.not_after = t(to);
        p.signed_by(key, &by.issuer).unwrap().pem()
    }

    fn leaf(by: &Ca, key: &KeyPair) -> String {
        leaf_between(by, NODE, key, now() - 30, now() + 30 * DAY)
    }

    fn judge(
        trusted: &[&Ca],
        bundle: &[&Ca],
        cross: Option<&str>,
        cert: &str,
        key: &KeyPair,
    ) -> Result<Admitted, String> {
        let trusted: Vec<Vec<u8>> = trusted.iter().map(|c| c.der.clone()).collect();
        let bundle: String = bundle.iter().map(|c| c.pem.as_str()).collect();
        admit(
            &trusted,
            &bundle,
            cross,
            cert,
            NODE,
            key.public_key_raw(),
            Some(now()),
        )
    }

    fn refused(r: Result<Admitted, String>, why: &str) {
        match r {
            Err(m) => assert!(m.contains(why), "refused for another reason: {m}"),
            Ok(a) => panic!("admitted ({a:?}); expected a refusal: {why}"),
        }
    }

    #[test]
    fn a_renewal_from_the_trusted_ca_is_admitted() {
        let a = ca("A");
        let key = KeyPair::generate().unwrap();
        let ok = judge(&[&a], &[&a], None, &leaf(&a, &key), &key).unwrap();
        assert_eq!(ok.endorsement, None);
    }

    #[test]
    fn bundles_the_contract_does_not_allow_are_refused() {
        let (a, x, y) = (ca("A"), ca("X"), ca("Y"));
        let key = KeyPair::generate().unwrap();
        let cert = leaf(&a, &key);
        // Three certificates: the real CA and two others (the finding).
        refused(judge(&[&a], &[&a, &x, &y], None, &cert, &key), "holds 3");
        // [real, other]: looks like an overlap, but nothing vouches for the other.
        refused(judge(&[&a], &[&a, &x], None, &cert, &key), "does not trust");
        // Another CA alone, with a certificate from it.
        let xcert = leaf(&x, &key);
        refused(judge(&[&a], &[&x], None, &xcert, &key), "does not trust");
        // ... with a cross-certificate signed by itself or by another untrusted CA.
        let self_cross = cross("X", &x, &x);
        refused(
            judge(&[&a], &[&x], Some(&self_cross), &xcert, &key),
            "does not trust",
        );
        let y_cross = cross("X", &x, &y);
        refused(
            judge(&[&a], &[&x], Some(&y_cross), &xcert, &key),
            "does not trust",
        );
        // The same CA twice, an empty bundle, garbage, a leaf in place of a CA.
        refused(judge(&[&a], &[&a, &a], None, &cert, &key), "twice");
        refused(judge(&[&a], &[], None, &cert, &key), "CA bundle");
        let trusted = vec![a.der.clone()];
        refused(
            admit(
                &trusted,
                "garbage",
                None,
                &cert,
                NODE,
                key.public_key_raw(),
                Some(now()),
            ),
            "",
        );
        let not_ca = format!("{}{}", a.pem, leaf(&a, &KeyPair::generate().unwrap()));
        refused(
            admit(
                &trusted,
                &not_ca,
                None,
                &cert,
                NODE,
                key.public_key_raw(),
                Some(now()),
            ),
            "not a CA",
        );
    }

    #[test]
    fn a_rotation_is_followed_only_with_a_cross_certificate_from_a_trusted_ca() {
        let (a, b) = (ca("A"), ca("B"));
        let key = KeyPair::generate().unwrap();
        let from_b = leaf(&b, &key);
        let a_for_b = cross("B", &b, &a);
        // The overlap: [A, B] with A's cross-certificate for B.
        let ok = judge(&[&a], &[&a, &b], Some(&a_for_b), &from_b, &key).unwrap();
        assert_eq!(ok.endorsement.as_deref(), Some(a_for_b.as_str()));
        // Without it, B is not admitted.
        refused(
            judge(&[&a], &[&a, &b], None, &from_b, &key),
            "does not trust",
        );
        // A node that missed the whole overlap: [B] with the cross-certificate.
        let ok = judge(&[&a], &[&b], Some(&a_for_b), &from_b, &key).unwrap();
        assert!(ok.endorsement.is_some());
        // After the overlap: B trusted already; the cross-certificate still endorses it.
        let ok = judge(&[&a, &b], &[&b], Some(&a_for_b), &from_b, &key).unwrap();
        assert!(ok.endorsement.is_some());
        let ok = judge(&[&a, &b], &[&b], None, &from_b, &key).unwrap();
        assert_eq!(ok.endorsement, None);
        // A cross-certificate for B's name but another key does not vouch for this B.
        let b2 = ca("B");
        let a_for_b2 = cross("B", &b2, &a);
        refused(
            judge(&[&a], &[&b], Some(&a_for_b2), &from_b, &key),
            "does not trust",
        );
        // Nor for another name with B's key.
        let renamed = cross("C", &b, &a);
        refused(
            judge(&[&a], &[&b], Some(&renamed), &from_b, &key),
            "does not trust",
        );
        // Two certificates in the cross-certificate field.
        let two = format!("{a_for_b}{a_for_b}");
        refused(judge(&[&a], &[&b], Some(&two), &from_b, &key), "holds 2");
    }

    #[test]
    fn the_certificate_must_be_this_nodes_this_keys_valid_and_sane() {
        let a = ca("A");
        let key = KeyPair::generate().unwrap();
        let n = now();
        // Expired (right node, right key: the finding), not yet valid.
        let expired = leaf_between(&a, NODE, &key, n - 40 * DAY, n - 10 * DAY);
        refused(judge(&[&a], &[&a], None, &expired, &key), "expired");
        let future = leaf_between(&a, NODE, &key, n + DAY, n + 31 * DAY);
        refused(judge(&[&a], &[&a], None, &future, &key), "not valid yet");
        // A little ahead is within the skew.
        let skewed = leaf_between(&a, NODE, &key, n + 60, n + 30 * DAY);
        judge(&[&a], &[&a], None, &skewed, &key).unwrap();
        // Another node, another key.
        let other = leaf_between(
            &a,
            "6a1f0e0c-0000-4000-8000-000000000002",
            &key,
            n - 30,
            n + DAY,
        );
        refused(
            judge(&[&a], &[&a], None, &other, &key),
            "does not name this node",
        );
        let stranger = KeyPair::generate().unwrap();
        refused(
            judge(&[&a], &[&a], None, &leaf(&a, &stranger), &key),
            "not for the key",
        );
        // Absurd lifetimes.
        let short = leaf_between(&a, NODE, &key, n - 10, n + 20);
        refused(judge(&[&a], &[&a], None, &short, &key), "lifetime");
        let long = leaf_between(&a, NODE, &key, n - 10, n + 500 * DAY);
        refused(judge(&[&a], &[&a], None, &long, &key), "lifetime");
        // Signed by a key that is not the bundle's CA's, under the CA's very name.
        let impostor = ca("A");
        refused(
            judge(&[&a], &[&a], None, &leaf(&impostor, &key), &key),
            "not signed by a CA of the bundle",
        );
        // Two certificates, or a CA certificate, in the certificate field.
        let two = format!("{}{}", leaf(&a, &key), leaf(&a, &key));
        refused(judge(&[&a], &[&a], None, &two, &key), "holds 2");
        let as_ca = ca_with_key("node", KeyPair::generate().unwrap());
        refused(
            judge(&[&a], &[&a], None, &as_ca.pem, &key),
            "CA certificate",
        );
    }
}
