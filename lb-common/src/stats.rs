//! Why a packet was passed, dropped or sent: named slots of the per-CPU `REASONS` array.
//!
//! Invariant: every packet the balancer sees increments exactly one reason slot, so the slots
//! add up to the packets seen (tests rely on it).

/// A named reason slot. The discriminant is the array index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed untouched.
    PassNotIp = 0,
    /// IP, but not for any VIP: passed untouched. TCP and UDP to a VIP address on a port no
    /// VIP serves count here too: telling them apart would cost every such packet an address
    /// lookup.
    PassNotVip,
    /// For an L7 VIP: passed to the kernel stack (the proxy). Fragments, IPv4 options and IPv6
    /// extension headers towards an address only L7 VIPs have count here too: the kernel, which
    /// terminates their traffic, reassembles and parses them.
    PassL7,
    /// Headers too short or inconsistent: passed untouched for the kernel to judge.
    PassMalformed,
    /// For a VIP address, but a protocol other than TCP and UDP that no VIP serves, or ICMP
    /// the balancer neither answers nor routes to a backend: passed untouched.
    PassNoService,
    /// IPv4 or IPv6 in a frame not sent to a unicast MAC (broadcast, multicast: the group bit
    /// of the destination set): passed untouched, never balanced or answered. An answer would
    /// carry that group address as its source MAC, which is never valid.
    PassNotUnicast,
    /// Fragment for the address of a VIP XDP balances (an L4 VIP): dropped (no L4 header to
    /// balance on).
    DropFragment,
    /// IPv4 options or IPv6 extension headers towards the address of an L4 VIP: dropped.
    DropIpOptions,
    /// The VIP has no backend in its ring, or the ring slot the flow hashes to names a backend
    /// that is gone or belongs to another VIP (a packet that read a VIP's entry just before a
    /// reload removed it).
    DropNoBackend,
    /// The packet did not fit after encapsulation and the ICMP answer could not be built.
    DropTooBig,
    /// Head/tail adjustment failed (no headroom).
    DropAdjustFailed,
    /// Encapsulated (IPIP, IP6IP6, 4in6) and sent.
    TxEncap,
    /// Destination MAC rewritten (L2 DSR) and sent.
    TxL2,
    /// ICMP echo to a VIP answered.
    TxIcmpEcho,
    /// ICMP frag-needed / packet-too-big sent back to the client.
    TxIcmpTooBig,
    /// ICMP error about a VIP flow forwarded to that flow's backend.
    TxIcmpToBackend,
}

/// Number of reason slots.
pub const REASON_COUNT: u32 = 16;

/// Slot names, in index order, as tests and benchmarks name the slots. /metrics does not show
/// them whole: it exports each as `edgelb_xdp_verdicts_total{action,reason}`, the name split at
/// its first `_` (`drop_fragment` is `{action="drop",reason="fragment"}`), so each starts with
/// `pass_`, `drop_` or `tx_`.
pub const REASON_NAMES: [&str; REASON_COUNT as usize] = [
    "pass_not_ip",
    "pass_not_vip",
    "pass_l7",
    "pass_malformed",
    "pass_no_service",
    "pass_not_unicast",
    "drop_fragment",
    "drop_ip_options",
    "drop_no_backend",
    "drop_too_big",
    "drop_adjust_failed",
    "tx_encap",
    "tx_l2",
    "tx_icmp_echo",
    "tx_icmp_too_big",
    "tx_icmp_to_backend",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_indices() {
        assert_eq!(REASON_NAMES[Reason::TxIcmpToBackend as usize], "tx_icmp_to_backend");
        assert_eq!(Reason::TxIcmpToBackend as u32 + 1, REASON_COUNT);
        assert_eq!(REASON_NAMES[Reason::PassNoService as usize], "pass_no_service");
        assert_eq!(REASON_NAMES[Reason::PassNotUnicast as usize], "pass_not_unicast");
    }

    /// Every name splits at its first `_` into the `action` and `reason` labels /metrics gives
    /// it.
    #[test]
    fn names_split_into_action_and_reason() {
        for name in REASON_NAMES {
            let (action, reason) = name.split_once('_').expect(name);
            assert!(["pass", "drop", "tx"].contains(&action), "{name}");
            assert!(!reason.is_empty(), "{name}");
        }
    }
}
