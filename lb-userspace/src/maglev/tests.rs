use super::*;
use std::net::{IpAddr, Ipv4Addr};

fn members(n: usize, weight: impl Fn(usize) -> u32) -> Vec<RingMember> {
    (0..n)
        .map(|i| {
            let a = IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1));
            RingMember::from_addr(a, weight(i))
        })
        .collect()
}

fn counts(ring: &[u32], n: usize) -> Vec<u32> {
    let mut c = vec![0u32; n];
    for &b in ring {
        c[b as usize] += 1;
    }
    c
}

#[test]
fn every_backend_gets_floor_or_ceil_of_its_weighted_share() {
    for (n, m) in [(3usize, 13u32), (3, 65_537), (7, 1_009), (100, 65_537), (10, 251)] {
        let ms = members(n, |i| (i % 4) as u32 + 1);
        let ring = Maglev.build(&ms, m).unwrap();
        assert_eq!(ring.len(), m as usize);
        let total: u64 = ms.iter().map(|b| b.weight as u64).sum();
        for (i, c) in counts(&ring, n).into_iter().enumerate() {
            let share = m as f64 * ms[i].weight as f64 / total as f64;
            assert!(
                c == share.floor() as u32 || c == share.ceil() as u32,
                "n={n} m={m} backend {i}: {c} slots, share {share}"
            );
        }
    }
}

#[test]
fn zero_weight_backends_get_no_slot_and_all_zero_is_none() {
    let ms = members(4, |i| if i == 2 { 0 } else { 1 });
    let ring = Maglev.build(&ms, 65_537).unwrap();
    assert_eq!(counts(&ring, 4)[2], 0);
    assert!(Maglev.build(&members(3, |_| 0), 13).is_none());
}

#[test]
fn config_order_does_not_matter() {
    let ms = members(10, |i| i as u32 % 3 + 1);
    let mut rev = ms.clone();
    rev.reverse();
    let a = Maglev.build(&ms, 1_009).unwrap();
    let b = Maglev.build(&rev, 1_009).unwrap();
    // Indices differ (they point into differently ordered slices); identities must not.
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(ms[*x as usize].id, rev[*y as usize].id);
    }
}

/// Fraction of slots whose backend identity changed between two rings.
fn moved(a: &[u32], am: &[RingMember], b: &[u32], bm: &[RingMember]) -> f64 {
    let diff = a.iter().zip(b).filter(|(x, y)| am[**x as usize].id != bm[**y as usize].id).count();
    diff as f64 / a.len() as f64
}

/// The table's extra disruption grows with N/M: at M = 65537 it is about 1.02x the ideal share
/// at N = 10 and 1.3x at N = 100 (classic Maglev: 1.58x there; docs/ARCHITECTURE.md, "Maglev").
/// Bounded at the target, 1.5x, so a regression fails.
const DISRUPTION_BOUND: f64 = 1.5;

#[test]
fn removing_one_of_n_moves_at_most_one_and_a_half_ideal_shares() {
    for n in [3usize, 10, 30, 100] {
        let ms = members(n, |_| 1);
        let before = Maglev.build(&ms, 65_537).unwrap();
        for victim in [0, n / 2, n - 1] {
            let mut fewer = ms.clone();
            fewer.remove(victim);
            let after = Maglev.build(&fewer, 65_537).unwrap();
            let frac = moved(&before, &ms, &after, &fewer);
            let ideal = 1.0 / n as f64;
            assert!(
                frac <= DISRUPTION_BOUND * ideal,
                "n={n} victim={victim}: moved {frac}, ideal {ideal}"
            );
        }
    }
}

#[test]
fn adding_one_moves_at_most_one_and_a_half_ideal_shares() {
    for n in [3usize, 10, 30, 100] {
        let ms = members(n + 1, |_| 1);
        let fewer = ms[..n].to_vec();
        let before = Maglev.build(&fewer, 65_537).unwrap();
        let after = Maglev.build(&ms, 65_537).unwrap();
        let frac = moved(&before, &fewer, &after, &ms);
        let ideal = 1.0 / (n + 1) as f64;
        assert!(frac <= DISRUPTION_BOUND * ideal, "n={n}: moved {frac}, ideal {ideal}");
    }
}

/// Property test over pseudo-random backend sets and weights (a fixed xorshift stream, so a
/// failure reproduces).
#[test]
fn property_quotas_exact_for_random_sets() {
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..50 {
        let n = (rnd() % 40 + 1) as usize;
        let ms: Vec<RingMember> = (0..n)
            .map(|_| {
                let mut id = [0u8; 16];
                id.iter_mut().for_each(|b| *b = rnd() as u8);
                RingMember { id, weight: (rnd() % 20) as u32 }
            })
            .collect();
        let m = [13u32, 251, 1_009, 4_099][(rnd() % 4) as usize];
        let total: u64 = ms.iter().map(|b| b.weight as u64).sum();
        let Some(ring) = Maglev.build(&ms, m) else {
            assert_eq!(total, 0);
            continue;
        };
        for (i, c) in counts(&ring, n).into_iter().enumerate() {
            let share = m as f64 * ms[i].weight as f64 / total as f64;
            assert!(c == share.floor() as u32 || c == share.ceil() as u32);
        }
    }
}
