//! apt's machine-readable progress: the lines `APT::Status-Fd` writes (apt-get(8), "status-fd";
//! `pmstatus:`, `dlstatus:`, `pmerror:`, `pmconffile:`). With `APT::Status-Fd=1` they share
//! standard output with apt's text, so a line may also start after text that had no newline
//! (dpkg's "(Reading database ..." counter): the first status prefix in a line starts it.

/// One status line.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusLine {
    /// Which kind.
    pub kind: Kind,
    /// The package (for `dlstatus`: the file's index; for `pmconffile`: the conffile).
    pub subject: String,
    /// Overall progress, 0 to 100.
    pub percent: f64,
    /// apt's description.
    pub message: String,
}

/// The kind of a [`StatusLine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `pmstatus`: the package manager's progress on a package.
    Package,
    /// `dlstatus`: download progress.
    Download,
    /// `pmerror`: dpkg failed on a package.
    Error,
    /// `pmconffile`: a configuration file prompt (never answered interactively here).
    Conffile,
}

const PREFIXES: [(&str, Kind); 4] = [
    ("pmstatus:", Kind::Package),
    ("dlstatus:", Kind::Download),
    ("pmerror:", Kind::Error),
    ("pmconffile:", Kind::Conffile),
];

/// The status line in `line`, if it holds one.
pub fn parse_line(line: &str) -> Option<StatusLine> {
    let (start, prefix, kind) = PREFIXES
        .iter()
        .filter_map(|(p, k)| line.find(p).map(|i| (i, *p, *k)))
        .min_by_key(|(i, _, _)| *i)?;
    let rest = &line[start + prefix.len()..];
    // subject:percent:message, where a subject may hold ':' (`libc6:amd64`): the percent is
    // the first field after the subject that is a number.
    let parts: Vec<&str> = rest.splitn(8, ':').collect();
    for i in 1..parts.len() {
        let Ok(percent) = parts[i].trim().parse::<f64>() else {
            continue;
        };
        if !(0.0..=100.0).contains(&percent) {
            continue;
        }
        let subject = parts[..i].join(":");
        // The message is everything after the percent field, colons included.
        let offset: usize = parts[..=i].iter().map(|p| p.len() + 1).sum();
        let message = rest.get(offset..).unwrap_or("").trim_end().to_string();
        return Some(StatusLine {
            kind,
            subject,
            percent,
            message,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let l = parse_line("pmstatus:runostest-hello:20.0000:Unpacking runostest-hello (amd64)")
            .unwrap();
        assert_eq!(l.kind, Kind::Package);
        assert_eq!(l.subject, "runostest-hello");
        assert_eq!(l.percent, 20.0);
        assert_eq!(l.message, "Unpacking runostest-hello (amd64)");
        let l = parse_line("dlstatus:1:100.0000:Retrieving file 1 of 1").unwrap();
        assert_eq!((l.kind, l.subject.as_str()), (Kind::Download, "1"));
        let l = parse_line("pmstatus:libc6:amd64:40.0000:Installing libc6:amd64 (amd64)").unwrap();
        assert_eq!(l.subject, "libc6:amd64");
        assert_eq!(l.message, "Installing libc6:amd64 (amd64)");
        let l = parse_line(
            "pmerror:runostest-fail:66.6667:installed runostest-fail package post-installation script subprocess returned error exit status 1",
        )
        .unwrap();
        assert_eq!(
            (l.kind, l.subject.as_str()),
            (Kind::Error, "runostest-fail")
        );
        assert!(l.message.ends_with("exit status 1"));
        // After text without a newline.
        let l = parse_line("(Reading database ... 100%pmstatus:x1:10.0000:Preparing x1").unwrap();
        assert_eq!(l.subject, "x1");
        let l =
            parse_line("pmconffile:/etc/x.conf:50.0000:'/etc/x.conf' '/etc/x.conf.dpkg-new' 1 1")
                .unwrap();
        assert_eq!(
            (l.kind, l.subject.as_str()),
            (Kind::Conffile, "/etc/x.conf")
        );
        for not in [
            "",
            "Setting up x (1.0) ...",
            "pmstatus:",
            "pmstatus:x:notanumber:y",
            "dlstatus:1:200:too much",
        ] {
            assert_eq!(parse_line(not), None, "{not:?}");
        }
    }
}
