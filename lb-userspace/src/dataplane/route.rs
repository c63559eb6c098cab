//! Where a flow goes: the address words, keys, rings and hashes the XDP program uses, computed
//! in user space, and the flow placement `edgelb route` and the tests ask about.
//!
//! Kept apart from the rest of the data path because none of it touches the kernel: these are
//! pure functions of the config, which the controller's apply, `edgelb route` (with or without
//! a controller) and the tests that check XDP's verdicts all share, so that they agree with the
//! program on which backend a flow gets.

use std::{collections::HashMap, net::IpAddr};

use lb_common::{AF_INET, AF_INET6, VipKey};

use crate::{
    config::{Config, Forwarding, HashMode, Vip},
    maglev::{ConsistentHash, Maglev, RingMember},
};

/// Address words of `addr` as the data path stores them (see lb-common).
pub fn addr_words(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], AF_INET6)
        }
    }
}

/// How many slots of `ring` each value (a backend's index or entry id) holds, in one pass:
/// `status` gives each backend's share of its VIP's ring from it, where a count per backend
/// (a scan of the ring for each) took O(backends x ring size), 0.7 s on the controller thread
/// at 4096 backends.
pub fn ring_slot_counts(ring: &[u32]) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for &v in ring {
        *counts.entry(v).or_insert(0) += 1;
    }
    counts
}

/// The map key of a configured VIP.
pub fn vip_key(vip: &Vip) -> VipKey {
    let (addr, family) = addr_words(vip.address);
    VipKey { addr, port: vip.port.to_be(), proto: vip.protocol.number(), family }
}

/// The ring a VIP gets for its configured backends, as indices into `vip.backends`.
pub fn vip_ring(vip: &Vip) -> Option<Vec<u32>> {
    if vip.forwarding == Forwarding::L7 {
        return None;
    }
    let members: Vec<RingMember> =
        vip.backends.iter().map(|b| RingMember::from_addr(b.address, b.weight)).collect();
    Maglev.build(&members, vip.ring_size)
}

/// The flow key the XDP program builds for a packet from `client:sport` to `vip` at `dport`.
fn flow_key(vip: &Vip, client: IpAddr, sport: u16, dport: u16) -> lb_common::FlowKey {
    let (src, family) = addr_words(client);
    let key = vip_key(vip);
    lb_common::FlowKey {
        src,
        dst: key.addr,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: key.proto,
        family,
        _pad: [0; 2],
    }
}

/// The ring hash the XDP program computes for a packet from `client:sport` to `vip` (sport only
/// matters for 5-tuple VIPs).
pub fn flow_hash(vip: &Vip, client: IpAddr, sport: u16) -> u32 {
    match vip.hash {
        HashMode::Client => {
            lb_common::hash::client_hash(&addr_words(client).0, lb_common::HASH_SEED)
        }
        HashMode::FiveTuple => lb_common::hash::five_tuple_hash(
            &flow_key(vip, client, sport, vip.port),
            lb_common::HASH_SEED,
        ),
    }
}

/// The connection-table hash of the flow `client:sport` → `vip` at `dport`, which also gives
/// the outer source address (and IPv6 flow label) of its encapsulated packets.
pub fn conn_hash(vip: &Vip, client: IpAddr, sport: u16, dport: u16) -> u32 {
    let key = flow_key(vip, client, sport, dport);
    if key.family == lb_common::AF_INET {
        lb_common::hash::flow_key_v4_hash(&key.v4(), lb_common::HASH_SEED)
    } else {
        lb_common::hash::flow_key_hash(&key, lb_common::HASH_SEED)
    }
}

/// The backend a new flow from `client` (with `sport`, for 5-tuple VIPs) gets on `vip`: the same
/// hash and ring the XDP program uses. `None` when the VIP has no backend with weight.
pub fn route(vip: &Vip, client: IpAddr, sport: u16) -> Option<&crate::config::Backend> {
    let ring = vip_ring(vip)?;
    let h = flow_hash(vip, client, sport);
    Some(&vip.backends[ring[(h % vip.ring_size) as usize] as usize])
}

/// A flow `edgelb route` asks about, resolved against a config: the VIP it reaches and the
/// fields XDP hashes. One resolution for both answers, the file's ([`RouteFlow::by_config`])
/// and the running controller's ([`Dataplane::live_route`](super::Dataplane::live_route)), so
/// they can differ only by the state the controller adds (drains, health verdicts, a reload not
/// yet made).
#[derive(Debug, Clone)]
pub struct RouteFlow<'c> {
    /// The VIP the flow reaches, as the config lists it.
    pub vip: &'c Vip,
    /// The client, in the family XDP sees (an IPv4-mapped address is its IPv4 client).
    pub client: IpAddr,
    /// The source port (0 when the VIP hashes the client address alone).
    pub sport: u16,
    /// The destination port: the VIP's, or for an any-port VIP the one it was given with.
    pub dport: u16,
}

/// Why `edgelb route` has no answer: the question is wrong (exit 2) or the VIP places no new
/// flow (exit 1). Apart, because scripts alert on the second: a VIP that sends its clients
/// nowhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No such VIP, a client of the other family, a missing `--sport` or port, or an L7 VIP:
    /// its proxy picks a backend per request, so no flow has one to name (and nothing is wrong
    /// with the VIP).
    #[error("{0}")]
    BadQuestion(String),
    /// The VIP has no backend for new flows.
    #[error("{0}")]
    NoBackend(String),
}

impl<'c> RouteFlow<'c> {
    /// Resolves `vip` (a name, address or address:port; `proto` when a TCP and a UDP VIP share
    /// them), `client` and `sport` against `cfg`, as XDP would see such a flow.
    pub fn resolve(
        cfg: &'c Config,
        vip: &str,
        proto: Option<crate::config::Protocol>,
        client: IpAddr,
        sport: Option<u16>,
    ) -> Result<RouteFlow<'c>, RouteError> {
        let v = cfg.find_vip(vip, proto).map_err(RouteError::BadQuestion)?;
        // An any-port VIP hashed on the 5-tuple places a flow by its destination port too: the
        // one the VIP is given with.
        let mut dport = v.port;
        if v.port == 0 && v.hash == HashMode::FiveTuple {
            dport = vip.parse::<std::net::SocketAddr>().map(|sa| sa.port()).map_err(|_| {
                RouteError::BadQuestion(format!(
                    "VIP {v} serves any port and hashes the 5-tuple: give it as address:port"
                ))
            })?;
        }
        // A client written IPv4-mapped is the IPv4 client whose packets XDP hashes; one of the
        // other family never reaches the VIP at all.
        let client = client.to_canonical();
        if client.is_ipv4() != v.address.is_ipv4() {
            return Err(RouteError::BadQuestion(format!(
                "client {client} and VIP {v} are of different address families: its packets never reach this VIP"
            )));
        }
        let sport = match (sport, v.hash) {
            (Some(p), _) => p,
            (None, HashMode::FiveTuple) => {
                return Err(RouteError::BadQuestion(format!(
                    "VIP {v} hashes the 5-tuple: give the flow's source port, --sport PORT"
                )));
            }
            (None, HashMode::Client) => 0,
        };
        if v.forwarding == Forwarding::L7 {
            return Err(RouteError::BadQuestion(format!(
                "VIP {v} is L7: its proxy picks a backend per request, not per flow by an XDP ring, so `route` has no answer for it (`edgelb status` shows its backends and the requests each was sent)"
            )));
        }
        Ok(RouteFlow { vip: v, client, sport, dport })
    }

    /// The VIP as the flow hashes it: its port the flow's destination port.
    pub(super) fn hashed_vip(&self) -> Vip {
        Vip { port: self.dport, ..self.vip.clone() }
    }

    /// The backend the ring of the config's weights gives the flow (no drains, no health
    /// verdicts): what `edgelb route` answers when no controller does.
    pub fn by_config(&self) -> Result<IpAddr, RouteError> {
        route(&self.hashed_vip(), self.client, self.sport).map(|b| b.address).ok_or_else(|| {
            RouteError::NoBackend(format!("VIP {} has no backend with weight", self.vip))
        })
    }
}

/// Inverse of [`addr_words`].
pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(std::net::Ipv4Addr::from(words[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(o))
    }
}

#[cfg(test)]
mod tests {
    use super::{ring_slot_counts, vip_ring};

    /// The slots each backend holds, counted in one pass over the ring, are those a scan of
    /// the ring for each backend counts, and add up to the ring's size.
    #[test]
    fn ring_slots_are_counted_as_a_scan_per_backend_counts_them() {
        let backends: Vec<String> = (0..40)
            .map(|i| format!("{{ address = \"198.18.2.{i}\", weight = {} }}", 1 + i % 5))
            .collect();
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = 80\nring_size = 4099\nbackends = [{}]\n",
            backends.join(", ")
        );
        let cfg = crate::config::Config::parse(&text, "t.toml".as_ref()).expect("valid");
        let ring = vip_ring(&cfg.vips[0]).expect("an XDP VIP has a ring");
        assert_eq!(ring.len(), 4099);
        let counts = ring_slot_counts(&ring);
        assert_eq!(counts.values().sum::<usize>(), ring.len());
        for i in 0..40u32 {
            let naive = ring.iter().filter(|&&x| x == i).count();
            assert_eq!(counts.get(&i).copied().unwrap_or(0), naive, "backend {i}");
            assert!(naive > 0, "backend {i} has slots");
        }
        assert_eq!(counts.len(), 40, "no value the ring does not hold");
        assert!(ring_slot_counts(&[]).is_empty());
    }
}
