//! The dpkg database through `dpkg-query -W -f=<format>`: a machine format of our own choosing,
//! one tab-separated row per package, never dpkg's or apt's human text.

use runos_protocol::instructions::PackageState;

/// The `dpkg-query --showformat` of [`parse`]: binary name (with `:arch` where dpkg needs it),
/// name, architecture, version, selection (want) and status.
pub const QUERY_FORMAT: &str = "${binary:Package}\\t${Package}\\t${Architecture}\\t${Version}\\t${db:Status-Want}\\t${db:Status-Status}\\n";

/// One row of the dpkg database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `${binary:Package}`: the name, `:arch` added for `Multi-Arch: same` packages.
    pub binary: String,
    /// `${Package}`.
    pub package: String,
    /// `${Architecture}`.
    pub arch: String,
    /// `${Version}` (also set for removed packages whose configuration files remain).
    pub version: String,
    /// `${db:Status-Want}`: `unknown`, `install`, `hold`, `deinstall` or `purge`.
    pub want: String,
    /// `${db:Status-Status}`: `installed`, `not-installed`, `config-files`, ...
    pub status: String,
}

/// A line of `dpkg-query` output that is not a row of [`QUERY_FORMAT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The 1-based line number.
    pub line: usize,
}

impl std::error::Error for ParseError {}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dpkg-query output line {} is not a row of the requested format",
            self.line
        )
    }
}

/// Parse `dpkg-query -W -f=`[`QUERY_FORMAT`] output. Empty lines are skipped.
pub fn parse(out: &str) -> Result<Vec<Row>, ParseError> {
    let mut rows = Vec::new();
    for (i, line) in out.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let [binary, package, arch, version, want, status] = f[..] else {
            return Err(ParseError { line: i + 1 });
        };
        if package.is_empty() || status.is_empty() {
            return Err(ParseError { line: i + 1 });
        }
        rows.push(Row {
            binary: binary.to_string(),
            package: package.to_string(),
            arch: arch.to_string(),
            version: version.to_string(),
            want: want.to_string(),
            status: status.to_string(),
        });
    }
    Ok(rows)
}

impl Row {
    /// Whether the package is on hold.
    pub fn held(&self) -> bool {
        self.want == "hold"
    }

    /// The installed (or unpacked) version; empty when only configuration files or nothing
    /// remain.
    pub fn installed_version(&self) -> &str {
        match self.status.as_str() {
            "not-installed" | "config-files" => "",
            _ => &self.version,
        }
    }

    /// The reply's view of this row, named `name`.
    pub fn state(&self, name: &str) -> PackageState {
        PackageState {
            name: name.to_string(),
            version: self.installed_version().to_string(),
            held: self.held(),
            status: self.status.clone(),
            changed: false,
        }
    }
}

/// The row of `name` (`pkg` or `pkg:arch`) among `rows`: the exact binary name, else for
/// `pkg:arch` the package of that architecture, else for `pkg` the first row of that package
/// that is not `not-installed`, else the first one.
pub fn find<'a>(name: &str, rows: &'a [Row]) -> Option<&'a Row> {
    if let Some(r) = rows.iter().find(|r| r.binary == name) {
        return Some(r);
    }
    match name.split_once(':') {
        Some((pkg, arch)) => rows.iter().find(|r| r.package == pkg && r.arch == arch),
        None => {
            let mut same = rows.iter().filter(|r| r.package == name);
            let first = same.clone().next();
            same.find(|r| r.status != "not-installed").or(first)
        }
    }
}

/// The state of `name`: its row, or `not-installed` with no version when dpkg has none.
pub fn state_of(name: &str, rows: &[Row]) -> PackageState {
    find(name, rows).map_or_else(
        || PackageState {
            name: name.to_string(),
            version: String::new(),
            held: false,
            status: "not-installed".into(),
            changed: false,
        },
        |r| r.state(name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "hello\thello\tamd64\t2.10-3\tinstall\tinstalled\n\
        libc6:amd64\tlibc6\tamd64\t2.36-9\tinstall\tinstalled\n\
        libc6:i386\tlibc6\ti386\t2.36-9\tdeinstall\tconfig-files\n\
        kubeadm\tkubeadm\tamd64\t1.30.2-1.1\thold\tinstalled\n\
        broken\tbroken\tall\t1.0-1\tinstall\thalf-configured\n\
        gone\tgone\t\t\tpurge\tnot-installed\n\n";

    #[test]
    fn rows_parse() {
        let rows = parse(OUT).unwrap();
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0].version, "2.10-3");
        assert!(rows[3].held());
        assert_eq!(rows[2].installed_version(), "");
        assert_eq!(rows[4].installed_version(), "1.0-1");
        assert_eq!(rows[5].arch, "");
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("a\tb\n").unwrap_err(), ParseError { line: 1 });
        assert!(parse("hello\thello\tamd64\t1\tinstall\tinstalled\textra\n").is_err());
        assert!(parse("dpkg-query: no packages found matching x\n").is_err());
    }

    #[test]
    fn names_are_found() {
        let rows = parse(OUT).unwrap();
        assert_eq!(find("hello", &rows).unwrap().binary, "hello");
        assert_eq!(find("libc6", &rows).unwrap().binary, "libc6:amd64");
        assert_eq!(find("libc6:i386", &rows).unwrap().status, "config-files");
        assert_eq!(find("hello:amd64", &rows).unwrap().binary, "hello");
        assert!(find("hello:arm64", &rows).is_none());
        let s = state_of("kubeadm", &rows);
        assert_eq!(
            (s.version.as_str(), s.held, s.status.as_str()),
            ("1.30.2-1.1", true, "installed")
        );
        let s = state_of("nothing", &rows);
        assert_eq!(
            (s.version.as_str(), s.status.as_str()),
            ("", "not-installed")
        );
        assert_eq!(state_of("gone", &rows).status, "not-installed");
    }
}
