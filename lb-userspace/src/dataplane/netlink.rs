//! What XDP program an interface runs, and in which mode, as the kernel says: rtnetlink
//! `RTM_GETLINK` and the interface's `IFLA_XDP` attributes (what `ip -d link` shows as
//! `xdp`/`xdpgeneric`). A bpf_link's own info names its interface but not the mode, so after a
//! restart that took the pinned link over, this is how edgelb learns whether XDP runs in the
//! driver; and when an attach finds the interface busy, which program holds it.
//!
//! One request and one answer over a `NETLINK_ROUTE` socket, built and parsed here: a few
//! fixed-layout headers do not warrant a netlink crate. Likewise, over generic netlink, whether
//! an interface merges received packets in software (GRO, [`gro_on`]), which XDP in generic
//! mode sees. And what the controller compares the config with while it runs: an interface's
//! MTU ([`link_info`]), the default routes' gateways ([`default_gateways`]) and the MACs the
//! neighbour table gives them ([`neighbours`]), asked of the kernel in edgelb's own network
//! namespace (sysfs shows the namespace of whoever mounted it, not necessarily this one).

use std::{io, io::Read, net::IpAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};

const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const RTMSG: usize = 12;
const NDMSG: usize = 12;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_VIA: u16 = 18;
const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;
const RTNH: usize = 8;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// The neighbour states whose link-layer address the kernel goes by: reachable, stale, delay
/// (stale, and being confirmed) and permanent. Incomplete, probing and failed entries hold none
/// that is known to be right; noarp ones none at all.
const NUD_KNOWN: u16 = 0x02 | 0x04 | 0x08 | 0x80;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_XDP: u16 = 43;
const NLA_TYPE_MASK: u16 = 0x3fff;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;
const XDP_ATTACHED_MULTI: u8 = 4;
const GENL_HDR: usize = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const ETHTOOL_MSG_FEATURES_GET: u8 = 11;
const ETHTOOL_A_FEATURES_HEADER: u16 = 1;
const ETHTOOL_A_FEATURES_ACTIVE: u16 = 4;
const ETHTOOL_A_HEADER_DEV_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BITS: u16 = 3;
const ETHTOOL_A_BITSET_BITS_BIT: u16 = 1;
const ETHTOOL_A_BITSET_BIT_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BIT_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

/// The mode XDP runs in on an interface, as the kernel reports it (`IFLA_XDP_ATTACHED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpRunMode {
    /// In the driver (`XDP_ATTACHED_DRV`): what `xdp_mode = "native"` asks for.
    Native,
    /// In the generic, skb-based path (`XDP_ATTACHED_SKB`): slower.
    Generic,
    /// Offloaded to the NIC (`XDP_ATTACHED_HW`); edgelb never attaches so.
    Offloaded,
    /// Programs in more than one mode at once (`XDP_ATTACHED_MULTI`).
    Multiple,
}

impl XdpRunMode {
    /// The word `status` and the logs use: the same as the attach modes' ("native",
    /// "generic").
    pub fn label(self) -> &'static str {
        match self {
            XdpRunMode::Native => "native",
            XdpRunMode::Generic => "generic",
            XdpRunMode::Offloaded => "offloaded",
            XdpRunMode::Multiple => "multiple",
        }
    }
}

/// The XDP program on an interface and its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpAttachment {
    /// The mode it runs in.
    pub mode: XdpRunMode,
    /// The program's id (for several modes, the driver's, else the generic one's).
    pub prog_id: u32,
    /// The ids of the programs in each mode (driver, generic, offloaded; 0 for none): with
    /// programs in several modes at once, `prog_id` names one of them only.
    pub by_mode: [u32; 3],
}

impl XdpAttachment {
    /// Does program `id` run on the interface, in any mode?
    pub fn runs(&self, id: u32) -> bool {
        id != 0 && (self.prog_id == id || self.by_mode.contains(&id))
    }
}

/// The XDP program attached to the interface with index `ifindex` in the calling thread's
/// network namespace, and its mode; `None` when it has none. An error when the interface does
/// not exist (ENODEV) or netlink cannot be asked.
pub fn xdp_attachment(ifindex: u32) -> io::Result<Option<XdpAttachment>> {
    let answer = ask_link(ifindex, &[])?;
    Ok(answer.as_deref().and_then(|m| xdp_of_link(m).ok()).flatten())
}

/// An interface as the kernel describes it (`RTM_GETLINK`), what the controller checks the
/// config against while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// Its index, which routes and neighbour entries name it by.
    pub index: u32,
    /// Its MTU (`IFLA_MTU`, as `ip link` shows it).
    pub mtu: u32,
}

/// The interface called `name` in the calling thread's network namespace (asked by name, so
/// that one answer gives index and MTU); `None` when there is none (ENODEV). An error when
/// netlink cannot be asked. Needs no capability.
pub fn link_info(name: &str) -> io::Result<Option<LinkInfo>> {
    let mut ifname = name.as_bytes().to_vec();
    ifname.push(0);
    match ask_link(0, &attribute(IFLA_IFNAME, &ifname)) {
        Ok(Some(m)) => link_info_of(&m).map(Some),
        Ok(None) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A next hop of a default route (0.0.0.0/0 or ::/0) of the main routing table: where the
/// kernel sends what it has no more specific route for, the router of the interface's segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    /// The interface it is reached by.
    pub ifindex: u32,
    /// Its address.
    pub address: IpAddr,
}

/// The gateways of the default routes of the main table, IPv4 and IPv6 (every next hop of a
/// multipath route), in the calling thread's network namespace. Needs no capability.
pub fn default_gateways() -> io::Result<Vec<Gateway>> {
    // rtmsg of family AF_UNSPEC: every family's routes.
    let answers = dump(RTM_GETROUTE, &[0; RTMSG])?;
    Ok(answers
        .iter()
        .filter(|(t, _)| *t == RTM_NEWROUTE)
        .flat_map(|(_, b)| gateways_of(b))
        .collect())
}

/// An entry of the kernel's neighbour table (ARP, NDP) with a link-layer address it goes by
/// ([`NUD_KNOWN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    /// The interface it is on.
    pub ifindex: u32,
    /// Its IP address.
    pub address: IpAddr,
    /// Its MAC.
    pub lladdr: [u8; 6],
}

/// The neighbour entries, IPv4 and IPv6, whose MAC the kernel goes by, in the calling thread's
/// network namespace. Needs no capability.
pub fn neighbours() -> io::Result<Vec<Neighbour>> {
    let answers = dump(RTM_GETNEIGH, &[0; NDMSG])?;
    Ok(answers
        .iter()
        .filter(|(t, _)| *t == RTM_NEWNEIGH)
        .filter_map(|(_, b)| neighbour_of(b))
        .collect())
}

/// The (type, body) of every message of the kernel's answer to a dump request of `kind` with
/// the fixed header `header` (its family and the like), up to its `NLMSG_DONE`.
fn dump(kind: u16, header: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    const SEQ: u32 = 1;
    let len = NLMSG_HDR + header.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&kind.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&SEQ.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(header);
    socket.send(&req)?;
    // Larger than any datagram the kernel sends a dump in (at most 32 KiB).
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = (&socket).read(&mut buf)?;
        if dump_part(&buf[..n], SEQ, &mut out)? {
            return Ok(out);
        }
    }
}

/// Adds the messages of one datagram of a dump's answer (request `seq`) to `out`; true once
/// its end is there. An error answer, or an end that carries one, is that errno.
fn dump_part(data: &[u8], seq: u32, out: &mut Vec<(u16, Vec<u8>)>) -> io::Result<bool> {
    for (kind, body) in replies(data, seq)? {
        match kind {
            NLMSG_ERROR | NLMSG_DONE => {
                // The end of a dump carries 0, or the error that cut it short.
                return match errno(body).unwrap_or(0) {
                    0 => Ok(true),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
            _ => out.push((kind, body.to_vec())),
        }
    }
    Ok(false)
}

/// The gateways a route message's body (`rtmsg` and attributes) gives, if it is a default
/// unicast route of the main table.
fn gateways_of(body: &[u8]) -> Vec<Gateway> {
    let Some(attrs) = body.get(RTMSG..) else { return Vec::new() };
    let (family, dst_len, table, kind) = (body[0], body[1], u32::from(body[4]), body[7]);
    let word = |v: &[u8]| v.get(..4).map(|b| u32::from_ne_bytes(b.try_into().unwrap()));
    let attr = |t: u16| attributes(attrs).find(|(a, _)| *a == t).map(|(_, v)| v);
    // Tables past 255 are in RTA_TABLE only.
    let table = attr(RTA_TABLE).and_then(word).unwrap_or(table);
    let ip = matches!(i32::from(family), libc::AF_INET | libc::AF_INET6);
    if !ip || dst_len != 0 || table != RT_TABLE_MAIN || kind != RTN_UNICAST {
        return Vec::new();
    }
    let mut out = Vec::new();
    if let (Some(ifindex), Some(address)) =
        (attr(RTA_OIF).and_then(word), gateway_in(attrs, family))
    {
        out.push(Gateway { ifindex, address });
    }
    // rtnexthop: length, flags, hops, interface index; then the hop's attributes.
    let mut hops = attr(RTA_MULTIPATH).unwrap_or_default();
    while hops.len() >= RTNH {
        let len = usize::from(u16_at(hops, 0));
        if len < RTNH || len > hops.len() {
            break;
        }
        if let Some(address) = gateway_in(&hops[RTNH..len], family) {
            out.push(Gateway { ifindex: u32_at(hops, 4), address });
        }
        hops = &hops[align4(len).min(hops.len())..];
    }
    out
}

/// The gateway address among route attributes `attrs` of a route of `family`: `RTA_GATEWAY`,
/// or `RTA_VIA` (a gateway of the other family: IPv4 routes through an IPv6 next hop).
fn gateway_in(attrs: &[u8], family: u8) -> Option<IpAddr> {
    attributes(attrs).find_map(|(t, v)| match t {
        RTA_GATEWAY => address_of(family, v),
        // struct rtvia: the address family (16 bits), then the address.
        RTA_VIA if v.len() > 2 => address_of(u16_at(v, 0) as u8, &v[2..]),
        _ => None,
    })
}

/// The address of `family` in `v`, if `v` is one.
fn address_of(family: u8, v: &[u8]) -> Option<IpAddr> {
    match i32::from(family) {
        libc::AF_INET => <[u8; 4]>::try_from(v).ok().map(IpAddr::from),
        libc::AF_INET6 => <[u8; 16]>::try_from(v).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The neighbour entry a neighbour message's body (`ndmsg` and attributes) gives, if it is an
/// IP one with a MAC the kernel goes by.
fn neighbour_of(body: &[u8]) -> Option<Neighbour> {
    let attrs = body.get(NDMSG..)?;
    let (family, ifindex, state) = (body[0], u32_at(body, 4), u16_at(body, 8));
    if state & NUD_KNOWN == 0 {
        return None;
    }
    let attr = |t: u16| attributes(attrs).find(|(a, _)| *a == t).map(|(_, v)| v);
    let address = address_of(family, attr(NDA_DST)?)?;
    let lladdr = <[u8; 6]>::try_from(attr(NDA_LLADDR)?).ok()?;
    Some(Neighbour { ifindex, address, lladdr })
}

/// The body (`ifinfomsg` and attributes) of the kernel's `RTM_NEWLINK` answer about the
/// interface of index `ifindex`, or (index 0) the one `attrs` name; `None` when the answer
/// holds none.
fn ask_link(ifindex: u32, attrs: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    const SEQ: u32 = 1;
    let len = NLMSG_HDR + IFINFOMSG + attrs.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&SEQ.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    // ifinfomsg: family AF_UNSPEC, pad, type, index, flags, change.
    req.extend_from_slice(&[0, 0, 0, 0]);
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&[0; 8]);
    req.extend_from_slice(attrs);
    // Unconnected, a netlink socket sends to the kernel.
    socket.send(&req)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = (&socket).read(&mut buf)?;
        if let Some(answer) = link_answer(&buf[..n], SEQ)? {
            return Ok(answer);
        }
    }
}

/// Whether `interface` (in the calling thread's network namespace) has generic receive offload
/// on: the kernel's ethtool features, as `ethtool -k` shows `generic-receive-offload`. XDP in
/// generic mode runs after GRO, so it sees TCP segments merged into packets larger than the
/// MTU: encapsulated, they no longer fit the path and are refused. Native XDP runs before GRO.
pub fn gro_on(interface: &str) -> io::Result<bool> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(libc::NETLINK_GENERIC)),
    )?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let ask = |kind: u16, cmd: u8, seq: u32, attrs: &[u8]| -> io::Result<Vec<u8>> {
        let len = NLMSG_HDR + GENL_HDR + attrs.len();
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&kind.to_ne_bytes());
        req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        req.extend_from_slice(&seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: command, version 1
        req.extend_from_slice(attrs);
        socket.send(&req)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = (&socket).read(&mut buf)?;
            if let Some(body) = genl_answer(&buf[..n], seq)? {
                return Ok(body);
            }
        }
    };
    let family =
        ask(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &attribute(CTRL_ATTR_FAMILY_NAME, b"ethtool\0"))?;
    let family = attributes(&family)
        .find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID)
        .and_then(|(_, v)| v.get(..2))
        .map(|v| u16::from_ne_bytes([v[0], v[1]]))
        .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "no ethtool netlink family"))?;
    let mut name = interface.as_bytes().to_vec();
    name.push(0);
    let header = attribute(
        ETHTOOL_A_FEATURES_HEADER | NLA_F_NESTED,
        &attribute(ETHTOOL_A_HEADER_DEV_NAME, &name),
    );
    // Bitsets in their verbose form (no compact flag): each feature by name.
    let features = ask(family, ETHTOOL_MSG_FEATURES_GET, 2, &header)?;
    Ok(active_features(&features).any(|(name, on)| name == b"rx-gro" && on))
}

/// The features of an `ETHTOOL_MSG_FEATURES_GET` answer's active set, by name, each with
/// whether it is on. A set without a mask lists the features that are on; one with a mask lists
/// every feature, those that are on with a value flag.
fn active_features(attrs: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    let active = attributes(attrs).find(|(t, _)| *t == ETHTOOL_A_FEATURES_ACTIVE).map(|(_, v)| v);
    let nomask = active.is_some_and(|a| attributes(a).any(|(t, _)| t == 1)); // ETHTOOL_A_BITSET_NOMASK
    let bits = active
        .and_then(|a| attributes(a).find(|(t, _)| *t == ETHTOOL_A_BITSET_BITS))
        .map_or(&[][..], |(_, v)| v);
    attributes(bits).filter(|(t, _)| *t == ETHTOOL_A_BITSET_BITS_BIT).filter_map(move |(_, bit)| {
        let name = attributes(bit).find(|(t, _)| *t == ETHTOOL_A_BITSET_BIT_NAME)?.1;
        let name = name.strip_suffix(b"\0").unwrap_or(name);
        let on = nomask || attributes(bit).any(|(t, _)| t == ETHTOOL_A_BITSET_BIT_VALUE);
        Some((name, on))
    })
}

/// The attributes of the generic netlink answer to request `seq` in one datagram: `Some` once
/// it is there (an error answer is its errno), `None` to read on.
fn genl_answer(data: &[u8], seq: u32) -> io::Result<Option<Vec<u8>>> {
    let Some(&(kind, body)) = replies(data, seq)?.first() else { return Ok(None) };
    if kind == NLMSG_ERROR {
        return Err(match errno(body)? {
            0 => malformed(),
            e => io::Error::from_raw_os_error(-e),
        });
    }
    body.get(GENL_HDR..).map(|a| Some(a.to_vec())).ok_or_else(malformed)
}

/// The (type, body) of each message in one datagram that answers request `seq`.
fn replies(mut data: &[u8], seq: u32) -> io::Result<Vec<(u16, &[u8])>> {
    let mut found = Vec::new();
    while data.len() >= NLMSG_HDR {
        let len = u32_at(data, 0) as usize;
        if len < NLMSG_HDR || len > data.len() {
            return Err(malformed());
        }
        if u32_at(data, 8) == seq {
            found.push((u16_at(data, 4), &data[NLMSG_HDR..len]));
        }
        data = &data[align4(len).min(data.len())..];
    }
    Ok(found)
}

/// The errno an `NLMSG_ERROR` body carries, negated as the kernel writes it (0: an
/// acknowledgement).
fn errno(body: &[u8]) -> io::Result<i32> {
    body.get(..4).map(|b| i32::from_ne_bytes(b.try_into().unwrap())).ok_or_else(malformed)
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer")
}

/// One netlink attribute, padded.
fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(align4(4 + value.len()));
    a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(align4(a.len()), 0);
    a
}

/// Reads the messages in one datagram: `Some(answer)` once the link message (or an error) for
/// request `seq` is there, `None` to read on.
#[cfg(test)]
fn parse_answer(data: &[u8], seq: u32) -> io::Result<Option<Option<XdpAttachment>>> {
    match link_answer(data, seq)? {
        Some(Some(body)) => Ok(Some(xdp_of_link(&body)?)),
        Some(None) => Ok(Some(None)),
        None => Ok(None),
    }
}

/// Reads the messages in one datagram: `Some(answer)` once the link message's body (or an
/// error) for request `seq` is there, `None` to read on.
fn link_answer(data: &[u8], seq: u32) -> io::Result<Option<Option<Vec<u8>>>> {
    for (kind, body) in replies(data, seq)? {
        match kind {
            NLMSG_ERROR => {
                return match errno(body)? {
                    0 => Ok(Some(None)),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
            NLMSG_DONE => return Ok(Some(None)),
            RTM_NEWLINK => {
                if body.len() < IFINFOMSG {
                    return Err(malformed());
                }
                return Ok(Some(Some(body.to_vec())));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// The XDP attachment a link message's body (`ifinfomsg` and attributes) describes, if any.
fn xdp_of_link(body: &[u8]) -> io::Result<Option<XdpAttachment>> {
    let attrs = body.get(IFINFOMSG..).ok_or_else(malformed)?;
    let xdp = attributes(attrs).find(|(t, _)| *t == IFLA_XDP).map(|(_, v)| v);
    Ok(xdp.and_then(xdp_of))
}

/// The index and MTU a link message's body gives; an error when it has no `IFLA_MTU`.
fn link_info_of(body: &[u8]) -> io::Result<LinkInfo> {
    let attrs = body.get(IFINFOMSG..).ok_or_else(malformed)?;
    let mtu = attributes(attrs)
        .find(|(t, _)| *t == IFLA_MTU)
        .and_then(|(_, v)| v.get(..4))
        .map(|v| u32::from_ne_bytes(v.try_into().unwrap()))
        .ok_or_else(malformed)?;
    Ok(LinkInfo { index: u32_at(body, 4), mtu })
}

/// The attachment the nested `IFLA_XDP` attributes describe, if any.
fn xdp_of(nested: &[u8]) -> Option<XdpAttachment> {
    let (mut attached, mut prog, mut drv, mut skb, mut hw) = (0u8, 0, 0, 0, 0);
    for (t, v) in attributes(nested) {
        let word = || v.get(..4).map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()));
        match t {
            IFLA_XDP_ATTACHED => attached = v.first().copied().unwrap_or(0),
            IFLA_XDP_PROG_ID => prog = word(),
            IFLA_XDP_DRV_PROG_ID => drv = word(),
            IFLA_XDP_SKB_PROG_ID => skb = word(),
            IFLA_XDP_HW_PROG_ID => hw = word(),
            _ => {}
        }
    }
    let mode = match attached {
        XDP_ATTACHED_DRV => XdpRunMode::Native,
        XDP_ATTACHED_SKB => XdpRunMode::Generic,
        XDP_ATTACHED_HW => XdpRunMode::Offloaded,
        XDP_ATTACHED_MULTI => XdpRunMode::Multiple,
        _ => return None,
    };
    let prog_id = [prog, drv, skb, hw].into_iter().find(|&id| id != 0).unwrap_or(0);
    Some(XdpAttachment { mode, prog_id, by_mode: [drv, skb, hw] })
}

/// The (type, payload) of each netlink attribute in `data` (the nested flag masked off).
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(data, 0));
        if len < 4 || len > data.len() {
            return None;
        }
        let item = (u16_at(data, 2) & NLA_TYPE_MASK, &data[4..len]);
        data = &data[align4(len).min(data.len())..];
        Some(item)
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(t: u16, v: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&t.to_ne_bytes());
        a.extend_from_slice(v);
        a.resize(align4(a.len()), 0);
        a
    }

    fn link_message(seq: u32, attrs: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        let len = NLMSG_HDR + IFINFOMSG + attrs.len();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[0; IFINFOMSG]);
        m.extend_from_slice(attrs);
        m
    }

    /// The mode and program come from the nested attributes, whatever precedes them; a link
    /// without XDP has none; an error answer is the errno it carries.
    #[test]
    fn answers_are_read_as_the_kernel_writes_them() {
        let mut nested = attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_DRV]);
        nested.extend(attr(IFLA_XDP_PROG_ID, &77u32.to_ne_bytes()));
        let mut attrs = attr(3, b"lb0\0"); // IFLA_IFNAME
        attrs.extend(attr(IFLA_XDP | 0x8000, &nested)); // NLA_F_NESTED
        let got = parse_answer(&link_message(1, &attrs), 1).unwrap();
        let want = XdpAttachment { mode: XdpRunMode::Native, prog_id: 77, by_mode: [0; 3] };
        assert_eq!(got, Some(Some(want)));

        let mut nested = attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB]);
        nested.extend(attr(IFLA_XDP_PROG_ID, &9u32.to_ne_bytes()));
        let got = parse_answer(&link_message(1, &attr(IFLA_XDP, &nested)), 1).unwrap();
        let want = XdpAttachment { mode: XdpRunMode::Generic, prog_id: 9, by_mode: [0; 3] };
        assert_eq!(got, Some(Some(want)));

        // Programs in two modes at once: no IFLA_XDP_PROG_ID, one id per mode; each runs.
        let mut nested = attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_MULTI]);
        nested.extend(attr(IFLA_XDP_DRV_PROG_ID, &5u32.to_ne_bytes()));
        nested.extend(attr(IFLA_XDP_SKB_PROG_ID, &6u32.to_ne_bytes()));
        let got = parse_answer(&link_message(1, &attr(IFLA_XDP, &nested)), 1).unwrap();
        let got = got.flatten().expect("an attachment");
        assert_eq!((got.mode, got.prog_id), (XdpRunMode::Multiple, 5));
        assert!(got.runs(5) && got.runs(6) && !got.runs(7) && !got.runs(0));

        let none = attr(IFLA_XDP, &attr(IFLA_XDP_ATTACHED, &[0]));
        assert_eq!(parse_answer(&link_message(1, &none), 1).unwrap(), Some(None));
        // Another request's answer is skipped.
        assert_eq!(parse_answer(&link_message(2, &none), 1).unwrap(), None);

        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&0u16.to_ne_bytes());
        err.extend_from_slice(&1u32.to_ne_bytes());
        err.extend_from_slice(&0u32.to_ne_bytes());
        err.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        let e = parse_answer(&err, 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        assert!(parse_answer(&[1, 0, 0, 0, 0, 0], 1).is_ok(), "too short to be a message");
        assert!(parse_answer(&link_message(1, &none)[..20], 1).is_err(), "cut short");
    }

    /// An interface's index and MTU come from the link message, whatever attributes surround
    /// the MTU; a message without one is no answer. The kernel's own answer for `lo`, asked in
    /// this namespace, gives what `ip link` would.
    #[test]
    fn the_mtu_is_read_from_the_link_message() {
        let mut attrs = attr(IFLA_IFNAME, b"xa0\0");
        attrs.extend(attr(IFLA_MTU, &1400u32.to_ne_bytes()));
        attrs.extend(attr(IFLA_XDP | 0x8000, &attr(IFLA_XDP_ATTACHED, &[0])));
        let mut m = link_message(1, &attrs);
        m[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&7i32.to_ne_bytes());
        let body = link_answer(&m, 1).unwrap().flatten().expect("a link message");
        assert_eq!(link_info_of(&body).unwrap(), LinkInfo { index: 7, mtu: 1400 });
        let body = link_answer(&link_message(1, &attr(IFLA_IFNAME, b"xa0\0")), 1).unwrap();
        assert!(link_info_of(&body.flatten().unwrap()).is_err(), "no IFLA_MTU");

        let lo = link_info("lo").expect("netlink answers").expect("lo is there");
        assert_eq!(lo.index, 1, "{lo:?}");
        // What `ip` (netlink too, in this namespace) says, where it is installed.
        if let Ok(out) =
            std::process::Command::new("ip").args(["-o", "link", "show", "lo"]).output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            let shown = text.split_whitespace().skip_while(|w| *w != "mtu").nth(1);
            assert_eq!(shown, Some(lo.mtu.to_string().as_str()), "{text}");
        }
        assert_eq!(link_info("no-such-if0").unwrap(), None);
    }

    /// A message of type `kind` for request `seq`: the fixed header `head`, then `attrs`.
    fn message(kind: u16, seq: u32, head: &[u8], attrs: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + head.len() + attrs.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(head);
        m.extend_from_slice(attrs);
        m
    }

    /// rtmsg: family, destination prefix length, table, type.
    fn rtmsg(family: i32, dst_len: u8, table: u8, kind: u8) -> [u8; RTMSG] {
        [family as u8, dst_len, 0, 0, table, 3, 0, kind, 0, 0, 0, 0]
    }

    /// The default routes' gateways are read as the kernel writes them: IPv4 with its output
    /// interface, IPv6 multipath with one per hop, an IPv4 route through an IPv6 next hop
    /// (RTA_VIA); routes that are not the main table's default unicast ones give none.
    #[test]
    fn default_gateways_are_read_from_route_messages() {
        let v4: IpAddr = "198.18.64.1".parse().unwrap();
        let (a6, b6): (IpAddr, IpAddr) = ("fe80::1".parse().unwrap(), "fe80::2".parse().unwrap());
        let oct = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let mut attrs = attr(RTA_TABLE, &254u32.to_ne_bytes());
        attrs.extend(attr(RTA_GATEWAY, &oct(v4)));
        attrs.extend(attr(RTA_OIF, &7u32.to_ne_bytes()));
        let head = rtmsg(libc::AF_INET, 0, 254, RTN_UNICAST);
        assert_eq!(
            gateways_of(&[&head[..], &attrs].concat()),
            [Gateway { ifindex: 7, address: v4 }]
        );
        for other in [
            rtmsg(libc::AF_INET, 24, 254, RTN_UNICAST),
            rtmsg(libc::AF_INET, 0, 255, RTN_UNICAST),
            rtmsg(libc::AF_INET, 0, 254, 2), // RTN_LOCAL
            rtmsg(128, 0, 254, RTN_UNICAST), // RTNL_FAMILY_IPMR
        ] {
            let attrs = [attr(RTA_GATEWAY, &oct(v4)), attr(RTA_OIF, &7u32.to_ne_bytes())].concat();
            assert_eq!(gateways_of(&[&other[..], &attrs].concat()), []);
        }
        // Table 254 in RTA_TABLE wins over the header's (which says 252 for tables past 255).
        let head = rtmsg(libc::AF_INET, 0, 252, RTN_UNICAST);
        assert_eq!(gateways_of(&[&head[..], &attrs].concat()).len(), 1);
        let attrs1000 = [attr(RTA_TABLE, &1000u32.to_ne_bytes()), attrs[8..].to_vec()].concat();
        assert_eq!(gateways_of(&[&head[..], &attrs1000].concat()), []);
        // Multipath: rtnexthop (length, flags, hops, ifindex), then the hop's gateway.
        let hop = |ifindex: u32, gw: IpAddr| {
            let gw = attr(RTA_GATEWAY, &oct(gw));
            let mut h = ((RTNH + gw.len()) as u16).to_ne_bytes().to_vec();
            h.extend_from_slice(&[0, 0]);
            h.extend_from_slice(&ifindex.to_ne_bytes());
            h.extend(gw);
            h
        };
        let hops = [hop(7, a6), hop(8, b6)].concat();
        let head = rtmsg(libc::AF_INET6, 0, 254, RTN_UNICAST);
        let got = gateways_of(&[&head[..], &attr(RTA_MULTIPATH, &hops)].concat());
        let want = [Gateway { ifindex: 7, address: a6 }, Gateway { ifindex: 8, address: b6 }];
        assert_eq!(got, want);
        // RFC 5549: an IPv4 default route through an IPv6 next hop.
        let mut via = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        via.extend(oct(a6));
        let attrs = [attr(RTA_VIA, &via), attr(RTA_OIF, &9u32.to_ne_bytes())].concat();
        let head = rtmsg(libc::AF_INET, 0, 254, RTN_UNICAST);
        assert_eq!(
            gateways_of(&[&head[..], &attrs].concat()),
            [Gateway { ifindex: 9, address: a6 }]
        );
        assert_eq!(gateways_of(&head[..5]), [], "cut short");
    }

    /// Neighbour entries give their MAC only in a state the kernel goes by; a dump's answer is
    /// read to its end over several datagrams, and an end carrying an error is that error.
    #[test]
    fn neighbours_and_dumps_are_read_as_the_kernel_writes_them() {
        let gw: IpAddr = "198.18.64.1".parse().unwrap();
        let mac = [2, 0xed, 0, 0, 0x64, 1];
        let ndmsg = |state: u16| {
            let mut h = vec![libc::AF_INET as u8, 0, 0, 0];
            h.extend_from_slice(&7i32.to_ne_bytes());
            h.extend_from_slice(&state.to_ne_bytes());
            h.extend_from_slice(&[0, 1]);
            h
        };
        let attrs = [attr(NDA_DST, &[198, 18, 64, 1]), attr(NDA_LLADDR, &mac)].concat();
        let entry = |state: u16| neighbour_of(&[ndmsg(state), attrs.clone()].concat());
        for state in [0x02, 0x04, 0x08, 0x80] {
            assert_eq!(entry(state), Some(Neighbour { ifindex: 7, address: gw, lladdr: mac }));
        }
        for state in [0x01, 0x10, 0x20, 0x40] {
            assert_eq!(entry(state), None, "state {state:#x}");
        }
        let no_mac = [ndmsg(0x02), attr(NDA_DST, &[198, 18, 64, 1])].concat();
        assert_eq!(neighbour_of(&no_mac), None);

        let mut out = Vec::new();
        let first = [message(RTM_NEWNEIGH, 1, &ndmsg(2), &attrs), message(9, 2, &[], &[])].concat();
        assert!(!dump_part(&first, 1, &mut out).unwrap(), "no end yet");
        let end = message(NLMSG_DONE, 1, &0i32.to_ne_bytes(), &[]);
        let second = [message(RTM_NEWNEIGH, 1, &ndmsg(4), &attrs), end].concat();
        assert!(dump_part(&second, 1, &mut out).unwrap());
        assert_eq!(out.len(), 2, "another request's message is not this dump's");
        let cut = message(NLMSG_DONE, 1, &(-libc::EINTR).to_ne_bytes(), &[]);
        let e = dump_part(&cut, 1, &mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR));
        // The kernel answers both dumps here, whatever the tables hold.
        default_gateways().expect("the routes can be dumped");
        neighbours().expect("the neighbours can be dumped");
    }
}
