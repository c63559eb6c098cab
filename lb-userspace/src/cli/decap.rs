//! `edgelb decap`: on a backend, attach or detach the XDP decapsulator, taking tunnels only from
//! the balancers' `encap_source` prefixes (`--allow-source`).

use std::{net::IpAddr, path::Path};

use super::Ending;
use crate::config::{Length, Prefix, XdpAttachMode};

/// A prefix of `edgelb decap --allow-source`, and the warning it gets, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowSource {
    /// The prefix: its address and length.
    pub prefix: (IpAddr, u8),
    /// Taken, but not written as a prefix is ([`Prefix::caution`]): what to say of it.
    pub caution: Option<String>,
}

/// Reads an `--allow-source`: an address prefix, `198.19.0.0/16` or `2001:db8:100::/96` (a bare
/// address, without `/`, is its own /32 or /128), read as the balancers' `encap_source` is
/// ([`Prefix`]). A `/` with no length after it is an error, not a host: an unset shell variable
/// (`198.19.0.0/$LEN`) would otherwise allow one address where a range was meant, and the
/// tunnels from the rest would pass unstripped. An IPv4-mapped IPv6 prefix is refused: it would
/// go into the IPv6 table and never match an IPv4 tunnel's source.
pub fn allow_source(s: &str) -> Result<AllowSource, String> {
    let prefix = Prefix::parse(s).ok_or_else(|| format!("`{s}` is not an address prefix"))?;
    if let IpAddr::V6(v6) = prefix.addr
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "`{s}` is an IPv4-mapped IPv6 prefix, which no IPv4 tunnel's source matches: write the IPv4 prefix"
        ));
    }
    let bits = prefix.max_len();
    let len = match (prefix.len, prefix.bits()) {
        (Length::TooLarge, _) => return Err(format!("`{s}`: bad prefix length")),
        (_, None) => {
            return Err(format!("`{s}`: bad prefix length (the number of bits after `/`)"));
        }
        (_, Some(len)) => len,
    };
    if len > bits {
        return Err(format!(
            "`{s}`: an IPv{} prefix is at most /{bits}",
            if bits == 32 { 4 } else { 6 }
        ));
    }
    let caution = prefix.caution().map(|why| format!("--allow-source `{s}`: {why}"));
    Ok(AllowSource { prefix: (prefix.addr, len), caution })
}

/// `edgelb decap attach|detach`: exit 0 done, 1 failed (the reason said), 2 bad arguments.
/// `mode` is `native`, `generic` or (anything else) `auto`; `allowed` is for `attach` only.
pub fn decap(
    attach: bool,
    interface: &str,
    mode: &str,
    pin_dir: &Path,
    allowed: &[AllowSource],
) -> Ending {
    if !pin_dir.to_str().is_some_and(crate::config::below_bpffs) {
        return Ending::new(2).err(
            "edgelb: --pin-dir must be a directory under /sys/fs/bpf/, named without `.` or `..`",
        );
    }
    let mut end = Ending::new(0);
    let result = if attach {
        let mode = match mode {
            "native" => XdpAttachMode::Native,
            "generic" => XdpAttachMode::Generic,
            _ => XdpAttachMode::Auto,
        };
        for caution in allowed.iter().filter_map(|a| a.caution.as_ref()) {
            end = end.err(format!("edgelb: warning: {caution}"));
        }
        if allowed.is_empty() {
            end = end.err(
                "edgelb: warning: no --allow-source: tunnels from any source are stripped, so anyone who can send IPIP to this backend can hand it packets from a source of their choosing; give the balancers' encap_source prefixes",
            );
        }
        let sources: Vec<(IpAddr, u8)> = allowed.iter().map(|a| a.prefix).collect();
        crate::dataplane::attach_decap(interface, mode, pin_dir, &sources).map(|used| {
            let from = if sources.is_empty() {
                "any source".to_owned()
            } else {
                sources.iter().map(|(a, l)| format!("{a}/{l}")).collect::<Vec<_>>().join(", ")
            };
            format!(
                "decapsulator attached to {interface} ({used}), pinned in {}, taking tunnels from {from}",
                pin_dir.display()
            )
        })
    } else {
        crate::dataplane::detach_decap(interface, pin_dir).map(|was| {
            if was {
                format!("decapsulator detached from {interface}")
            } else {
                format!("no decapsulator of edgelb's on {interface} (under {})", pin_dir.display())
            }
        })
    };
    match result {
        Ok(msg) => end.out(msg),
        Err(e) => {
            end.code = 1;
            end.err(format!("edgelb: {}", crate::error_chain(&e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_source_refuses_what_would_not_allow_what_was_meant() {
        for (bad, says) in [
            ("198.19.0/16", "`198.19.0/16` is not an address prefix"),
            ("198.19.0.0/", "`198.19.0.0/`: bad prefix length (the number of bits after `/`)"),
            ("2001:db8::/", "`2001:db8::/`: bad prefix length (the number of bits after `/`)"),
            (
                "198.19.0.0/-16",
                "`198.19.0.0/-16`: bad prefix length (the number of bits after `/`)",
            ),
            ("198.19.0.0/300", "`198.19.0.0/300`: bad prefix length"),
            ("198.19.0.0/33", "`198.19.0.0/33`: an IPv4 prefix is at most /32"),
            ("2001:db8::/129", "`2001:db8::/129`: an IPv6 prefix is at most /128"),
            (
                "::ffff:198.19.0.0/112",
                "`::ffff:198.19.0.0/112` is an IPv4-mapped IPv6 prefix, which no IPv4 tunnel's source matches: write the IPv4 prefix",
            ),
            // Mapped, and a bad length: the mapping is said first, as before.
            (
                "::ffff:198.19.0.0/",
                "`::ffff:198.19.0.0/` is an IPv4-mapped IPv6 prefix, which no IPv4 tunnel's source matches: write the IPv4 prefix",
            ),
        ] {
            assert_eq!(allow_source(bad), Err(says.to_owned()), "{bad}");
        }
        let v4 = |len| (IpAddr::from([198, 19, 0, 0]), len);
        for (good, prefix) in [
            ("198.19.0.0/16", v4(16)),
            ("198.19.0.0/016", v4(16)),
            ("198.19.0.0", v4(32)),
            ("198.19.0.0/0", v4(0)),
            ("2001:db8::/96", ("2001:db8::".parse().unwrap(), 96)),
            ("2001:db8::", ("2001:db8::".parse().unwrap(), 128)),
        ] {
            assert_eq!(allow_source(good), Ok(AllowSource { prefix, caution: None }), "{good}");
        }
        assert_eq!(
            allow_source("198.19.0.0/+16"),
            Ok(AllowSource {
                prefix: v4(16),
                caution: Some(
                    "--allow-source `198.19.0.0/+16`: a prefix length is digits alone, without a `+`: read as 198.19.0.0/16, which is how to write it"
                        .to_owned()
                ),
            })
        );
    }

    #[test]
    fn a_pin_dir_outside_bpffs_is_a_bad_argument() {
        for dir in ["/tmp/decap", "/sys/fs/bpf/../decap", "/sys/fs/bpf"] {
            let end = decap(true, "nosuch0", "auto", Path::new(dir), &[]);
            assert_eq!(end.code, 2, "{dir}");
            assert_eq!(
                end.stderr(),
                [
                    "edgelb: --pin-dir must be a directory under /sys/fs/bpf/, named without `.` or `..`"
                ],
                "{dir}"
            );
        }
    }
}
