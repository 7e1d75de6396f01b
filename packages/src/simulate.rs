//! apt's simulation (`apt-get -s`): what a change would remove, read before anything changes.
//!
//! apt-get(8) documents the simulation's output: one line per action, `Inst`, `Conf`, `Remv` or
//! `Purg`, the package name (with `:arch` on multi-arch systems), then its version in brackets.
//! Only the `Remv` and `Purg` lines are read here; everything else (apt's notices, the status
//! lines of `APT::Status-Fd`) is ignored.

/// The packages (names without `:arch`, sorted, each once) that the simulation `output` removes
/// or purges.
pub fn removals(output: &str) -> Vec<String> {
    let mut out: Vec<String> = output
        .lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("Remv ")
                .or_else(|| l.strip_prefix("Purg "))?;
            let name = rest.split_whitespace().next()?;
            Some(base(name).to_string())
        })
        .filter(|n| !n.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A package name without its `:arch`.
pub fn base(name: &str) -> &str {
    name.split_once(':').map_or(name, |(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_are_the_remv_and_purg_lines() {
        let out = "NOTE: This is only a simulation!\n\
                   pmstatus:dpkg-exec:0:Running dpkg\n\
                   Remv runostest-dep [1.0-1]\n\
                   Purg libfoo:amd64 [2.1-3] [libbar:amd64 ]\n\
                   Inst runostest-conflict (1.0-1 local [all])\n\
                   Conf runostest-conflict (1.0-1 local [all])\n\
                   Remv runostest-dep [1.0-1]\n\
                   Remv\n";
        assert_eq!(removals(out), ["libfoo", "runostest-dep"]);
        assert!(removals("Inst a (1 r [all])\nConf a (1 r [all])\n").is_empty());
        assert_eq!(base("kubeadm:amd64"), "kubeadm");
        assert_eq!(base("kubeadm"), "kubeadm");
    }
}
