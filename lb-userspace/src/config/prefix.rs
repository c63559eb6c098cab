//! Address prefixes, read one way wherever edgelb takes one: the node's `encap_source_v4` and
//! `encap_source_v6`, and `edgelb decap --allow-source`, which is given the balancers'
//! `encap_source` and must read it as they do. Each caller then applies its own policy (the
//! lengths it takes, the default of a bare address, the prefixes it refuses).

use std::net::IpAddr;

/// An address prefix as written: `198.19.0.0/16`, `2001:db8:100::/96`, or a bare address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The address before the `/` (the whole text, without one).
    pub addr: IpAddr,
    /// What follows the `/`.
    pub len: Length,
}

/// The length of a [`Prefix`], as written after its `/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// No `/`: a bare address.
    Omitted,
    /// Digits alone, without a leading zero (`/16`).
    Plain(u8),
    /// Digits alone, with leading zeros (`/016`): the same length.
    Padded(u8),
    /// Digits after a `+` (`/+16`). Not a length's form, but edgelb's config took it for
    /// `encap_source_v4` (Rust's integer parser does), and a file that ran before must run
    /// after an upgrade: taken, with a caution ([`Prefix::caution`]).
    Signed(u8),
    /// Nothing (`198.19.0.0/`, an unset `$LEN`) or not digits: no length, and no host either,
    /// which would allow one address where a range was meant.
    NotDigits,
    /// Digits past 255: no address has that many bits.
    TooLarge,
}

impl Prefix {
    /// Reads `addr[/len]`. None when what is before the `/` is no address; a length that is
    /// not one is [`Length::NotDigits`] or [`Length::TooLarge`], for the caller to refuse in
    /// its own words (after its checks of the address, which it may want to say first).
    pub fn parse(s: &str) -> Option<Prefix> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr = addr.parse().ok()?;
        let len = match len {
            None => Length::Omitted,
            Some(l) => {
                let (signed, digits) = match l.strip_prefix('+') {
                    Some(d) => (true, d),
                    None => (false, l),
                };
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    Length::NotDigits
                } else {
                    match digits.parse::<u8>() {
                        Err(_) => Length::TooLarge,
                        Ok(n) if signed => Length::Signed(n),
                        Ok(n) if digits.len() > 1 && digits.starts_with('0') => Length::Padded(n),
                        Ok(n) => Length::Plain(n),
                    }
                }
            }
        };
        Some(Prefix { addr, len })
    }

    /// The most bits a prefix of its family has: 32 or 128.
    pub fn max_len(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// Its length: the number written, or for a bare address its own /32 or /128. None when
    /// what follows the `/` is no length. Not checked against [`Prefix::max_len`].
    pub fn bits(&self) -> Option<u8> {
        match self.len {
            Length::Omitted => Some(self.max_len()),
            Length::Plain(n) | Length::Padded(n) | Length::Signed(n) => Some(n),
            Length::NotDigits | Length::TooLarge => None,
        }
    }

    /// What to say of a prefix taken although not written as one should be (a `+` before its
    /// length), for the caller to prefix with the key or flag and the text: a warning, since a
    /// file or command that worked before is not refused.
    pub fn caution(&self) -> Option<String> {
        match self.len {
            Length::Signed(n) => Some(format!(
                "a prefix length is digits alone, without a `+`: read as {}/{n}, which is how to write it",
                self.addr
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_digits_and_a_plus_is_taken_with_a_caution() {
        let v4: IpAddr = "198.19.0.0".parse().unwrap();
        let v6: IpAddr = "2001:db8::".parse().unwrap();
        for (text, want) in [
            ("198.19.0.0", Some((v4, Length::Omitted, Some(32)))),
            ("198.19.0.0/16", Some((v4, Length::Plain(16), Some(16)))),
            ("198.19.0.0/0", Some((v4, Length::Plain(0), Some(0)))),
            ("198.19.0.0/016", Some((v4, Length::Padded(16), Some(16)))),
            ("198.19.0.0/+16", Some((v4, Length::Signed(16), Some(16)))),
            ("198.19.0.0/+016", Some((v4, Length::Signed(16), Some(16)))),
            ("198.19.0.0/33", Some((v4, Length::Plain(33), Some(33)))),
            ("198.19.0.0/", Some((v4, Length::NotDigits, None))),
            ("198.19.0.0/+", Some((v4, Length::NotDigits, None))),
            ("198.19.0.0/++16", Some((v4, Length::NotDigits, None))),
            ("198.19.0.0/-16", Some((v4, Length::NotDigits, None))),
            ("198.19.0.0/ 16", Some((v4, Length::NotDigits, None))),
            ("198.19.0.0/16 ", Some((v4, Length::NotDigits, None))),
            ("198.19.0.0/0x10", Some((v4, Length::NotDigits, None))),
            ("198.19.0.0/16/1", Some((v4, Length::NotDigits, None))),
            ("198.19.0.0/256", Some((v4, Length::TooLarge, None))),
            ("198.19.0.0/99999999999999999999", Some((v4, Length::TooLarge, None))),
            ("2001:db8::", Some((v6, Length::Omitted, Some(128)))),
            ("2001:db8::/96", Some((v6, Length::Plain(96), Some(96)))),
            ("2001:db8::/+96", Some((v6, Length::Signed(96), Some(96)))),
            ("2001:db8::/", Some((v6, Length::NotDigits, None))),
            ("198.19.0/16", None),
            ("[2001:db8::]/96", None),
            ("/16", None),
            ("", None),
        ] {
            let got = Prefix::parse(text).map(|p| (p.addr, p.len, p.bits()));
            assert_eq!(got, want, "{text:?}");
        }
        let signed = Prefix::parse("198.19.0.0/+16").unwrap();
        assert_eq!(
            signed.caution().as_deref(),
            Some(
                "a prefix length is digits alone, without a `+`: read as 198.19.0.0/16, which is how to write it"
            )
        );
        for plain in ["198.19.0.0/16", "198.19.0.0/016", "198.19.0.0"] {
            assert_eq!(Prefix::parse(plain).unwrap().caution(), None, "{plain}");
        }
    }
}
