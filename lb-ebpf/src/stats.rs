//! Counter updates. Per-CPU slots, so plain adds are race-free.

use crate::maps::{BACKEND_STATS, CT_STATS, REASONS, VIP_STATS};
use lb_common::stats::Reason;

/// Counts one packet under `reason`.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU array element, valid for the program's run and touched only by this
        // CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds one forwarded packet of `bytes` to a VIP and its backend.
#[inline(always)]
pub fn count_forward(vip_index: u32, backend: u32, bytes: u64, new_flow: bool) {
    let new = new_flow as u64;
    if let Some(c) = VIP_STATS.get_ptr_mut(vip_index) {
        // SAFETY: per-CPU array element, see `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU array element, see `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new;
        }
    }
}

/// Counts one connection-table event (a `lb_common::ct_stats` slot).
#[inline(always)]
pub fn count_ct(slot: u32) {
    if let Some(c) = CT_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU array element, see `count`.
        unsafe { *c += 1 };
    }
}
