//! The Rekor-v1-like transparency log: `dsse` 0.0.1 entry bodies, the signed
//! entry timestamp (inclusion promise), RFC 6962 Merkle inclusion proofs and
//! signed-note checkpoints.

use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::keys::EcKey;

type Hash = [u8; 32];

/// RFC 6962 §2.1 leaf hash: SHA-256(0x00 ‖ entry).
pub(crate) fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// RFC 6962 §2.1 interior node hash: SHA-256(0x01 ‖ left ‖ right).
fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (`n` ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// RFC 6962 §2.1 Merkle Tree Hash over leaf hashes.
pub(crate) fn tree_hash(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&tree_hash(&leaves[..k]), &tree_hash(&leaves[k..]))
        }
    }
}

/// RFC 6962 §2.1.1 audit path for leaf `m`, bottom-up.
pub(crate) fn audit_path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut path = audit_path(m, &leaves[..k]);
        path.push(tree_hash(&leaves[k..]));
        path
    } else {
        let mut path = audit_path(m - k, &leaves[k..]);
        path.push(tree_hash(&leaves[..k]));
        path
    }
}

/// The canonicalized body Rekor stores for a `dsse` 0.0.1 entry. Field order
/// is that of Rekor's canonical JSON (keys sorted).
pub(crate) fn dsse_entry_body(
    envelope_json: &[u8],
    payload: &[u8],
    signature: &[u8],
    leaf_pem: &str,
) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct HashValue {
        algorithm: &'static str,
        value: String,
    }
    #[derive(Serialize)]
    struct Sig {
        signature: String,
        verifier: String,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        envelope_hash: HashValue,
        payload_hash: HashValue,
        signatures: Vec<Sig>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        api_version: &'static str,
        kind: &'static str,
        spec: Spec,
    }
    let body = Body {
        api_version: "0.0.1",
        kind: "dsse",
        spec: Spec {
            envelope_hash: HashValue {
                algorithm: "sha256",
                value: hex::encode(Sha256::digest(envelope_json)),
            },
            payload_hash: HashValue {
                algorithm: "sha256",
                value: hex::encode(Sha256::digest(payload)),
            },
            signatures: vec![Sig {
                signature: B64.encode(signature),
                verifier: B64.encode(leaf_pem.as_bytes()),
            }],
        },
    };
    Ok(serde_json::to_vec(&body)?)
}

/// The signed entry timestamp: the log key's signature over the RFC 8785
/// canonical JSON `{"body","integratedTime","logID","logIndex"}`.
pub(crate) fn signed_entry_timestamp(
    log_key: &EcKey,
    body: &[u8],
    integrated_time: i64,
    log_index: u64,
) -> Result<Vec<u8>> {
    // Keys in RFC 8785 order (by UTF-16 code unit); integers and base64/hex
    // strings need no further canonicalization.
    #[derive(Serialize)]
    struct Payload {
        body: String,
        #[serde(rename = "integratedTime")]
        integrated_time: i64,
        #[serde(rename = "logID")]
        log_id: String,
        #[serde(rename = "logIndex")]
        log_index: u64,
    }
    let payload = serde_json::to_vec(&Payload {
        body: B64.encode(body),
        integrated_time,
        log_id: hex::encode(log_key.key_id()),
        log_index,
    })?;
    log_key.sign(&payload)
}

/// A signed note (checkpoint): `origin\nsize\nbase64(root)\n\n— name
/// base64(keyhint ‖ signature)\n`, the key hint being the first four bytes of
/// SHA-256 of the log's DER public key.
pub(crate) fn checkpoint(
    log_key: &EcKey,
    origin: &str,
    signer_name: &str,
    tree_size: u64,
    root: &Hash,
) -> Result<String> {
    let note = format!("{origin}\n{tree_size}\n{}\n", B64.encode(root));
    let mut sig = log_key.key_id()[..4].to_vec();
    sig.extend(log_key.sign(note.as_bytes())?);
    Ok(format!(
        "{note}\n\u{2014} {signer_name} {}\n",
        B64.encode(sig)
    ))
}

/// What the log hands back for an entry: the bundle's `tlogEntries[]` item.
pub(crate) struct LogEntryRequest<'a> {
    pub log_key: &'a EcKey,
    pub origin: &'a str,
    pub signer_name: &'a str,
    pub body: &'a [u8],
    pub integrated_time: i64,
    /// Index in the log shard's tree (`inclusionProof.logIndex`).
    pub tree_index: u64,
    /// Leaves after this one in the tree the checkpoint commits to.
    pub later_leaves: u64,
    /// Global log index (`logIndex`, signed by the SET).
    pub log_index: u64,
}

pub(crate) fn log_entry(req: &LogEntryRequest<'_>) -> Result<Value> {
    let tree_size = req.tree_index + 1 + req.later_leaves;
    let leaves: Vec<Hash> = (0..tree_size)
        .map(|i| {
            if i == req.tree_index {
                leaf_hash(req.body)
            } else {
                leaf_hash(format!("runos-testsign filler entry {i}").as_bytes())
            }
        })
        .collect();
    let idx = usize::try_from(req.tree_index)?;
    let root = tree_hash(&leaves);
    let hashes: Vec<String> = audit_path(idx, &leaves)
        .iter()
        .map(|h| B64.encode(h))
        .collect();
    let set = signed_entry_timestamp(req.log_key, req.body, req.integrated_time, req.log_index)?;
    let note = checkpoint(req.log_key, req.origin, req.signer_name, tree_size, &root)?;
    Ok(json!({
        "logIndex": req.log_index.to_string(),
        "logId": { "keyId": B64.encode(req.log_key.key_id()) },
        "kindVersion": { "kind": "dsse", "version": "0.0.1" },
        "integratedTime": req.integrated_time.to_string(),
        "inclusionPromise": { "signedEntryTimestamp": B64.encode(set) },
        "inclusionProof": {
            "logIndex": req.tree_index.to_string(),
            "rootHash": B64.encode(root),
            "treeSize": tree_size.to_string(),
            "hashes": hashes,
            "checkpoint": { "envelope": note },
        },
        "canonicalizedBody": B64.encode(req.body),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recomputes the root from a leaf and its audit path (RFC 9162 §2.1.3.2).
    fn root_from_path(mut index: u64, size: u64, leaf: Hash, path: &[Hash]) -> Hash {
        let mut last = size - 1;
        let mut r = leaf;
        for p in path {
            if index & 1 == 1 || index == last {
                r = node_hash(p, &r);
                while index & 1 == 0 && index != 0 {
                    index >>= 1;
                    last >>= 1;
                }
            } else {
                r = node_hash(&r, p);
            }
            index >>= 1;
            last >>= 1;
        }
        r
    }

    #[test]
    fn audit_paths_reproduce_the_root_for_every_leaf_and_size() {
        for size in 1..=17u64 {
            let leaves: Vec<Hash> = (0..size).map(|i| leaf_hash(&i.to_be_bytes())).collect();
            let root = tree_hash(&leaves);
            for m in 0..size {
                let path = audit_path(m as usize, &leaves);
                assert_eq!(
                    root_from_path(m, size, leaves[m as usize], &path),
                    root,
                    "size {size} leaf {m}"
                );
            }
        }
    }
}
