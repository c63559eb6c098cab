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
//! MTU ([`link_info`]), the gateway of the route to a backend ([`gateway_to`]) and the MAC the
//! neighbour table gives it ([`neighbour`]), asked of the kernel in edgelb's own network
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
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_VIA: u16 = 18;
const RTN_UNICAST: u8 = 1;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NDA_IFINDEX: u16 = 8;
/// The neighbour states whose link-layer address the kernel goes by: reachable, stale, delay
/// (stale, and being confirmed), probe (being confirmed again: the kernel still sends to it
/// meanwhile) and permanent. Incomplete and failed entries hold none that is known to be
/// right; noarp ones none at all.
const NUD_KNOWN: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x80;
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

/// The next hop the kernel gives a route: the router it hands the packets to, on the
/// interface they leave by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    /// The interface it is reached by.
    pub ifindex: u32,
    /// Its address.
    pub address: IpAddr,
}

/// The gateway of the route the kernel picks for a packet to `dst` leaving by the interface of
/// index `ifindex` (what `ip route get <dst> oif <interface>` shows, the chosen next hop of a
/// multipath route included), in the calling thread's network namespace; `None` when that route
/// has no gateway (`dst` on the link), is not a unicast one, or leaves by another interface. An
/// error when the kernel has no route (ENETUNREACH) or cannot be asked. One question and one
/// answer, not a dump: a node holding a full BGP table would read a million routes at each
/// look. Needs no capability.
pub fn gateway_to(dst: IpAddr, ifindex: u32) -> io::Result<Option<Gateway>> {
    let answer = ask(&route_request(dst, ifindex), RTM_NEWROUTE, RTMSG)?;
    Ok(answer.as_deref().and_then(route_gateway).filter(|g| g.ifindex == ifindex))
}

/// An `RTM_GETROUTE` request (not a dump) for the route to `dst` out of interface `ifindex`:
/// an `rtmsg` of `dst`'s family with a full-length destination, then `RTA_DST` and `RTA_OIF`.
fn route_request(dst: IpAddr, ifindex: u32) -> Vec<u8> {
    let (family, octets) = family_and_octets(dst);
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut head = [0u8; RTMSG];
    head[0] = family;
    head[1] = (octets.len() * 8) as u8;
    let attrs = [attribute(RTA_DST, &octets), attribute(RTA_OIF, &ifindex.to_ne_bytes())];
    request(RTM_GETROUTE, NLM_F_REQUEST, &head, &attrs.concat())
}

/// The gateway a route message's body (`rtmsg` and attributes) gives, if it is a unicast route
/// through one: its `RTA_OIF` and `RTA_GATEWAY` (or `RTA_VIA`).
fn route_gateway(body: &[u8]) -> Option<Gateway> {
    let attrs = body.get(RTMSG..)?;
    let (family, kind) = (body[0], body[7]);
    if kind != RTN_UNICAST {
        return None;
    }
    let oif = attributes(attrs).find(|(t, _)| *t == RTA_OIF).and_then(|(_, v)| v.get(..4))?;
    let ifindex = u32::from_ne_bytes(oif.try_into().unwrap());
    Some(Gateway { ifindex, address: gateway_in(attrs, family)? })
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

/// The neighbour entry of `address` on the interface of index `ifindex` (what `ip neigh get`
/// shows), in the calling thread's network namespace, if it holds a MAC the kernel goes by;
/// `None` when there is none. One question (Linux 5.0 and later); before that, the family's
/// entries on that interface, read one datagram at a time and not kept. Needs no capability.
pub fn neighbour(ifindex: u32, address: IpAddr) -> io::Result<Option<Neighbour>> {
    let (family, octets) = family_and_octets(address);
    let wanted = |n: &Neighbour| n.ifindex == ifindex && n.address == address;
    let get =
        request(RTM_GETNEIGH, NLM_F_REQUEST, &ndmsg(family, ifindex), &attribute(NDA_DST, &octets));
    match ask(&get, RTM_NEWNEIGH, NDMSG) {
        Ok(answer) => Ok(answer.as_deref().and_then(neighbour_of).filter(wanted)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        // No RTM_GETNEIGH for one entry before Linux 5.0: the interface's entries instead.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let filter = attribute(NDA_IFINDEX, &ifindex.to_ne_bytes());
            let req = request(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, &ndmsg(family, 0), &filter);
            let mut found = None;
            dump(&req, |kind, body| {
                if kind == RTM_NEWNEIGH {
                    found = found.or(neighbour_of(body).filter(wanted));
                }
            })?;
            Ok(found)
        }
        Err(e) => Err(e),
    }
}

/// An `ndmsg` of `family` for the interface of index `ifindex` (0: any), state and flags 0.
fn ndmsg(family: u8, ifindex: u32) -> [u8; NDMSG] {
    let mut head = [0u8; NDMSG];
    head[0] = family;
    head[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    head
}

/// The address family (`AF_INET`, `AF_INET6`) and bytes of `address`.
fn family_and_octets(address: IpAddr) -> (u8, Vec<u8>) {
    match address {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    }
}

/// A `NETLINK_ROUTE` socket that gives up reading after 2 s.
fn route_socket() -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(socket)
}

/// The sequence number of every request here: one request per socket.
const SEQ: u32 = 1;

/// A request of `kind` with `flags` (request [`SEQ`]): the fixed header `head` (`rtmsg`,
/// `ndmsg`, ...), then the attributes `attrs`.
fn request(kind: u16, flags: u16, head: &[u8], attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + head.len() + attrs.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&kind.to_ne_bytes());
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&SEQ.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    req.extend_from_slice(head);
    req.extend_from_slice(attrs);
    req
}

/// Sends `req` (not a dump) and returns the body of the kernel's answer of type `kind`, at
/// least `min` bytes long; `None` when it answers with none. An error answer is its errno.
fn ask(req: &[u8], kind: u16, min: usize) -> io::Result<Option<Vec<u8>>> {
    let socket = route_socket()?;
    // Unconnected, a netlink socket sends to the kernel.
    socket.send(req)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = (&socket).read(&mut buf)?;
        if let Some(answer) = answer_of(&buf[..n], SEQ, kind, min)? {
            return Ok(answer);
        }
    }
}

/// Sends the dump request `req` and hands `each` the (type, body) of every message of the
/// kernel's answer, one datagram at a time, up to its `NLMSG_DONE`: nothing of it is kept.
fn dump(req: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let socket = route_socket()?;
    socket.send(req)?;
    // Larger than any datagram the kernel sends a dump in (at most 32 KiB).
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = (&socket).read(&mut buf)?;
        if dump_part(&buf[..n], SEQ, &mut each)? {
            return Ok(());
        }
    }
}

/// Hands `each` the messages of one datagram of a dump's answer (request `seq`); true once its
/// end is there. An error answer, or an end that carries one, is that errno.
fn dump_part(data: &[u8], seq: u32, each: &mut impl FnMut(u16, &[u8])) -> io::Result<bool> {
    for (kind, body) in replies(data, seq)? {
        match kind {
            NLMSG_ERROR | NLMSG_DONE => {
                // The end of a dump carries 0, or the error that cut it short.
                return match errno(body).unwrap_or(0) {
                    0 => Ok(true),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
            _ => each(kind, body),
        }
    }
    Ok(false)
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
    // ifinfomsg: family AF_UNSPEC, pad, type, index, flags, change.
    let mut head = [0u8; IFINFOMSG];
    head[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    ask(&request(RTM_GETLINK, NLM_F_REQUEST, &head, attrs), RTM_NEWLINK, IFINFOMSG)
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
#[cfg(test)]
fn link_answer(data: &[u8], seq: u32) -> io::Result<Option<Option<Vec<u8>>>> {
    answer_of(data, seq, RTM_NEWLINK, IFINFOMSG)
}

/// Reads the messages in one datagram: `Some(answer)` once the body of the message of type
/// `kind` (at least `min` bytes, else malformed), or an error, for request `seq` is there
/// (`Some(None)`: an acknowledgement or an end without one), `None` to read on.
fn answer_of(data: &[u8], seq: u32, kind: u16, min: usize) -> io::Result<Option<Option<Vec<u8>>>> {
    for (k, body) in replies(data, seq)? {
        match k {
            NLMSG_ERROR => {
                return match errno(body)? {
                    0 => Ok(Some(None)),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
            NLMSG_DONE => return Ok(Some(None)),
            k if k == kind => {
                if body.len() < min {
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

    /// The question about the route to a backend is `ip route get <dst> oif <if>`'s: one
    /// RTM_GETROUTE, not a dump, of the destination's family and full length, with RTA_DST and
    /// RTA_OIF; the kernel takes it (a local destination has no gateway).
    #[test]
    fn the_route_to_one_address_is_asked_not_dumped() {
        let req = route_request("198.18.66.11".parse().unwrap(), 7);
        assert_eq!(u32_at(&req, 0) as usize, req.len());
        assert_eq!(u16_at(&req, 4), RTM_GETROUTE);
        assert_eq!(u16_at(&req, 6), NLM_F_REQUEST, "not NLM_F_DUMP");
        assert_eq!(&req[NLMSG_HDR..NLMSG_HDR + 2], &[libc::AF_INET as u8, 32]);
        let attrs: Vec<_> = attributes(&req[NLMSG_HDR + RTMSG..]).collect();
        assert_eq!(attrs, [(RTA_DST, &[198, 18, 66, 11][..]), (RTA_OIF, &7u32.to_ne_bytes()[..])]);
        let req = route_request("2001:2::11".parse().unwrap(), 7);
        assert_eq!(&req[NLMSG_HDR..NLMSG_HDR + 2], &[libc::AF_INET6 as u8, 128]);
        assert_eq!(attributes(&req[NLMSG_HDR + RTMSG..]).next().unwrap().1.len(), 16);
        let lo = link_info("lo").unwrap().expect("lo").index;
        assert_eq!(gateway_to("127.0.0.1".parse().unwrap(), lo).unwrap(), None);
        assert_eq!(gateway_to("::1".parse().unwrap(), lo).unwrap(), None);
    }

    /// The answer's gateway is read as the kernel writes it: RTA_GATEWAY with RTA_OIF, or
    /// RTA_VIA (an IPv4 route through an IPv6 next hop); a route without a gateway (on the
    /// link) or that is not unicast gives none.
    #[test]
    fn the_gateway_is_read_from_the_route_answer() {
        let v4: IpAddr = "198.18.64.1".parse().unwrap();
        let a6: IpAddr = "fe80::1".parse().unwrap();
        let oif = attr(RTA_OIF, &7u32.to_ne_bytes());
        let attrs =
            [attr(RTA_DST, &[198, 18, 66, 11]), attr(RTA_GATEWAY, &[198, 18, 64, 1]), oif.clone()]
                .concat();
        let head = rtmsg(libc::AF_INET, 32, 254, RTN_UNICAST);
        let body = [&head[..], &attrs].concat();
        assert_eq!(route_gateway(&body), Some(Gateway { ifindex: 7, address: v4 }));
        let m = message(RTM_NEWROUTE, 1, &head, &attrs);
        assert_eq!(answer_of(&m, 1, RTM_NEWROUTE, RTMSG).unwrap(), Some(Some(body)));
        let on_link = [attr(RTA_DST, &[198, 18, 66, 11]), oif.clone()].concat();
        assert_eq!(route_gateway(&[&head[..], &on_link].concat()), None);
        let local = rtmsg(libc::AF_INET, 32, 255, 2); // RTN_LOCAL
        assert_eq!(route_gateway(&[&local[..], &attrs].concat()), None);
        let mut via = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        if let IpAddr::V6(a) = a6 {
            via.extend(a.octets());
        }
        let attrs = [attr(RTA_VIA, &via), attr(RTA_OIF, &9u32.to_ne_bytes())].concat();
        let got = route_gateway(&[&head[..], &attrs].concat());
        assert_eq!(got, Some(Gateway { ifindex: 9, address: a6 }));
        assert_eq!(route_gateway(&head[..5]), None, "cut short");
        let unreachable = message(NLMSG_ERROR, 1, &(-libc::ENETUNREACH).to_ne_bytes(), &[]);
        let e = answer_of(&unreachable, 1, RTM_NEWROUTE, RTMSG).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENETUNREACH));
    }

    /// Neighbour entries give their MAC only in a state the kernel goes by (probe included:
    /// it still sends to that MAC meanwhile); the question about one entry is `ip neigh
    /// get`'s (RTM_GETNEIGH with the interface and NDA_DST, not a dump), which the kernel
    /// takes; a dump's answer is read to its end over several datagrams, and an end carrying
    /// an error is that error.
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
        for state in [0x02, 0x04, 0x08, 0x10, 0x80] {
            assert_eq!(entry(state), Some(Neighbour { ifindex: 7, address: gw, lladdr: mac }));
        }
        for state in [0x01, 0x20, 0x40] {
            assert_eq!(entry(state), None, "state {state:#x}");
        }
        let no_mac = [ndmsg(0x02), attr(NDA_DST, &[198, 18, 64, 1])].concat();
        assert_eq!(neighbour_of(&no_mac), None);
        assert_eq!(
            super::ndmsg(libc::AF_INET6 as u8, 7)[..8],
            [libc::AF_INET6 as u8, 0, 0, 0, 7, 0, 0, 0]
        );

        let mut n = 0;
        let mut count = |kind: u16, _: &[u8]| n += usize::from(kind == RTM_NEWNEIGH);
        let first = [message(RTM_NEWNEIGH, 1, &ndmsg(2), &attrs), message(9, 2, &[], &[])].concat();
        assert!(!dump_part(&first, 1, &mut count).unwrap(), "no end yet");
        let end = message(NLMSG_DONE, 1, &0i32.to_ne_bytes(), &[]);
        let second = [message(RTM_NEWNEIGH, 1, &ndmsg(4), &attrs), end].concat();
        assert!(dump_part(&second, 1, &mut count).unwrap());
        let cut = message(NLMSG_DONE, 1, &(-libc::EINTR).to_ne_bytes(), &[]);
        let e = dump_part(&cut, 1, &mut count).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR));
        assert_eq!(n, 2, "another request's message is not this dump's");
        // The kernel answers the question, here that there is no such entry.
        let lo = link_info("lo").unwrap().expect("lo").index;
        assert_eq!(neighbour(lo, "198.18.64.1".parse().unwrap()).unwrap(), None);
    }
}
