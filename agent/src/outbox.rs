//! Final replies held until the control plane ACKs them.
//!
//! In memory in this version; a later issue makes it durable, so the dispatcher uses only the
//! small API below. The outbox is bounded in entries and bytes: the dispatcher answers `busy`
//! rather than accept an instruction whose reply it could not hold.

use std::collections::{HashMap, VecDeque};

use runos_protocol::{Envelope, Tag};

/// Replies awaiting ACK, in the order they were produced.
#[derive(Debug)]
pub struct Outbox {
    held: HashMap<Tag, Envelope>,
    order: VecDeque<Tag>,
    bytes: usize,
    max_items: usize,
    max_bytes: usize,
}

fn size(env: &Envelope) -> usize {
    env.json_b64.len() + 128
}

impl Outbox {
    /// An empty outbox holding at most `max_items` replies and about `max_bytes` bytes.
    pub fn new(max_items: usize, max_bytes: usize) -> Self {
        Outbox {
            held: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_items,
            max_bytes,
        }
    }

    /// Whether `extra` more replies (not yet produced) can still be accepted.
    pub fn has_room(&self, extra: usize) -> bool {
        self.held.len() + extra < self.max_items && self.bytes < self.max_bytes
    }

    /// Hold a final reply until it is ACKed (replaces an older reply with the same tag).
    pub fn hold(&mut self, env: Envelope) {
        let tag = env.tag;
        self.bytes += size(&env);
        if let Some(old) = self.held.insert(tag, env) {
            self.bytes = self.bytes.saturating_sub(size(&old));
        } else {
            self.order.push_back(tag);
        }
    }

    /// The held reply for `tag`.
    pub fn get(&self, tag: &Tag) -> Option<&Envelope> {
        self.held.get(tag)
    }

    /// Drop the reply `tag`; false when nothing was held for it.
    pub fn ack(&mut self, tag: &Tag) -> bool {
        match self.held.remove(tag) {
            Some(env) => {
                self.bytes = self.bytes.saturating_sub(size(&env));
                self.order.retain(|t| t != tag);
                true
            }
            None => false,
        }
    }

    /// Every held reply, oldest first (to resend after WELCOME).
    pub fn pending(&self) -> Vec<Envelope> {
        self.order
            .iter()
            .filter_map(|t| self.held.get(t).cloned())
            .collect()
    }

    /// Number of held replies.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(tag: Tag) -> Envelope {
        Envelope::with_type("NO_CONTENT", tag, &serde_json::json!({}))
    }

    #[test]
    fn hold_ack_pending() {
        let mut o = Outbox::new(3, 1 << 20);
        let (a, b) = (Tag::random(), Tag::random());
        o.hold(env(a));
        o.hold(env(b));
        o.hold(env(a));
        assert_eq!(o.len(), 2);
        assert_eq!(
            o.pending().iter().map(|e| e.tag).collect::<Vec<_>>(),
            vec![a, b]
        );
        assert!(o.has_room(0));
        assert!(!o.has_room(1));
        assert!(o.ack(&a));
        assert!(!o.ack(&a));
        assert_eq!(o.pending().len(), 1);
        assert!(o.get(&b).is_some());
    }
}
