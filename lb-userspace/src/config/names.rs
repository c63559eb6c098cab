//! The names a file gives: network interfaces (the kernel's rule for a device name) and VIPs.
//! A VIP's name goes into `edgelb route` (which takes a name before an address), log fields,
//! metric labels and `edgelb status`, so one that reads as an address is refused, and one that
//! could hide the VIP at an address, or forge a line where it is shown, gets a caution.

use std::net::{IpAddr, Ipv6Addr};

use super::{
    message::{Invalid, bad, quoted},
    raw,
};

/// Can `name` be a network interface's name? The kernel's rule (`dev_valid_name`): 1 to 15
/// bytes, not `.` or `..`, no `/`, `:` or whitespace. Whether it exists is left to `edgelb run`
/// (`check` may run on another machine).
pub(super) fn interface_name_ok(name: &str) -> Result<(), String> {
    const IFNAMSIZ: usize = 16;
    let shown = quoted(name);
    if name.is_empty() {
        return Err("an interface name is empty".to_owned());
    }
    if name.len() >= IFNAMSIZ {
        return Err(format!(
            "`{shown}` is {} bytes, and interface names are at most {} bytes",
            name.len(),
            IFNAMSIZ - 1
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!(
            "`{shown}` cannot be an interface's name (no `/`, `:` or spaces, not `.` or `..`)"
        ));
    }
    Ok(())
}

/// A VIP's name, which `edgelb route` takes in place of an address (names are matched first):
/// not empty, and not itself an address.
pub(super) fn vip_name_ok(name: &raw::Sp<String>) -> Result<(), Invalid> {
    let n = name.get_ref();
    if n.is_empty() {
        return bad(name.span(), "a VIP needs a name (e.g. name = \"web\")");
    }
    if n.parse::<IpAddr>().is_ok() || n.parse::<std::net::SocketAddr>().is_ok() {
        return bad(
            name.span(),
            format!(
                "VIP name `{}` reads as an address: `edgelb route` takes a VIP's name or its address, so a name must not look like one; use a word (e.g. name = \"web\")",
                quoted(n)
            ),
        );
    }
    Ok(())
}

/// The longest VIP name without a caution: names are log fields and metric labels, read by
/// people.
const VIP_NAME_CAUTION: usize = 64;

/// Why a VIP's name, accepted, is a caution: an IPv6 address in brackets (`[2001:db8::10]`),
/// characters outside `[A-Za-z0-9._-]`, or more than [`VIP_NAME_CAUTION`] bytes. `edgelb route`
/// takes a bracketed IPv6 address as that address
/// ([`Config::find_vip`](super::Config::find_vip)) but a name first, so
/// such a name hides the VIP at that address from it; names that parse as an address or
/// address:port are refused ([`vip_name_ok`]), but bracketed ones were accepted before route
/// took them. A name goes as it is into log fields, metric labels and `edgelb status`, where a
/// control character (a newline, an escape sequence) or a line separator (U+2028) can forge or
/// hide a line on a terminal or in a log pipeline. Not an error: a file that ran must still
/// start after an upgrade.
pub(super) fn vip_name_caution(name: &str) -> Option<String> {
    let shown = quoted(name);
    if let Some(a) = name
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse::<Ipv6Addr>().ok())
    {
        return Some(format!(
            "VIP `{shown}`: its name reads as the IPv6 address {a} in brackets: `edgelb route {shown}` finds this VIP by its name first, not the VIP at {a}; use a word (e.g. name = \"web\")"
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Some(format!(
            "VIP `{shown}`: its name has characters outside [A-Za-z0-9._-]: names go as they are into log fields, metric labels and `edgelb status`, where a control character or a line separator can forge or hide a line; write letters, digits, `.`, `_` and `-`"
        ));
    }
    (name.len() > VIP_NAME_CAUTION).then(|| {
        format!(
            "VIP `{shown}`: its name is {} bytes, more than {VIP_NAME_CAUTION}: names go into every log line, metric label and `edgelb status` row of the VIP; write a shorter one",
            name.len()
        )
    })
}
