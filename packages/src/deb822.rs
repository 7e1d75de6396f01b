//! deb822 stanzas (`apt-cache show`): `Field: value` lines, continuation lines starting with a
//! space or tab, stanzas separated by blank lines.

/// One stanza: its fields in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stanza {
    /// `(name, value)`; a multi-line value keeps its continuation lines, joined with `\n`.
    pub fields: Vec<(String, String)>,
}

impl Stanza {
    /// The value of `name` (field names are case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parse deb822 text. Lines that are neither a field nor a continuation (no `:`) are skipped.
pub fn parse(text: &str) -> Vec<Stanza> {
    let mut out = Vec::new();
    let mut cur = Stanza::default();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.fields.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.fields.last_mut() {
                v.push('\n');
                v.push_str(line.trim_start());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            cur.fields
                .push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if !cur.fields.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas() {
        let text = "Package: kubeadm\nVersion: 1.30.2-1.1\nDescription: Command-line utility\n \
                    more text\n .\nFilename: pool/kubeadm_1.30.2-1.1_amd64.deb\n\n\n\
                    Package: kubeadm\nStatus: install ok installed\nVersion: 1.30.1-1.1\n";
        let s = parse(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].get("version"), Some("1.30.2-1.1"));
        assert_eq!(
            s[0].get("Description"),
            Some("Command-line utility\nmore text\n.")
        );
        assert!(s[0].get("Filename").is_some());
        assert_eq!(s[1].get("Filename"), None);
        assert_eq!(s[1].get("Status"), Some("install ok installed"));
        assert!(parse("").is_empty());
        assert!(parse("\n\n").is_empty());
    }
}
