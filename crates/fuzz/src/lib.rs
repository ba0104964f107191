//! Fuzz targets for the doors' decoders: MQTT packets, CoAP datagrams,
//! CBOR bodies and door payloads (docs/fuzzing.md).
//!
//! Each target is a plain `fn(&[u8])` that must never panic and asserts
//! cheap invariants (round trips, consistency between two paths). The
//! tests in `tests/doors.rs` run them with `bolero::check!()`: briefly on
//! random inputs under `cargo test`, coverage-guided under `cargo bolero`.
//!
//! Random bytes rarely get past a decoder's first checks, so a target
//! reads its input as "take seed N (a real packet), apply these few
//! edits" ([`mutate`]); one choice of seed takes the input as it is.

pub mod seeds;
pub mod targets;

pub use targets::{Server, cbor, coap, coap_requests, door_content, mqtt};

/// Bytes with a meaning in the formats fuzzed here (CBOR initial bytes,
/// MQTT packet types, CoAP header bytes, varint edges, JSON syntax).
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1f, 0x3f, 0x5f, 0x7b, 0x9f, 0xbf, 0xf9, 0xfa,
    0xfb, 0xf4, 0xf5, 0xf6, 0xf7, 0xc0, 0xc2, 0x10, 0x20, 0x30, 0x32, 0x62, 0x82, 0xe0, 0x40, 0x41, 0x50, 0x60, 0x0d,
    0x0e, b'{', b'}', b'[', b']', b'"', b'\\', b'-', b'.', b'e', b'0', b'9', b',', b':', b' ',
];

/// Turns fuzz input into the bytes a decoder sees. The first byte picks a
/// seed, modulo `seeds.len() + 1`: the extra choice takes the rest of the
/// input as it is. The second says how many edits (1–6) follow, 4 bytes
/// each (kind, position high, position low, value); what is left is
/// material to splice in.
pub fn mutate(seeds: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let Some((&pick, rest)) = input.split_first() else {
        return Vec::new();
    };
    let pick = usize::from(pick) % (seeds.len() + 1);
    if pick == seeds.len() {
        return rest.to_vec();
    }
    let mut out = seeds[pick].clone();
    let Some((&n, mut rest)) = rest.split_first() else {
        return out;
    };
    // Mostly one or two edits: more rarely leaves anything valid to go
    // deep with (whole garbage is covered by the pass-through choice).
    let count = [1, 1, 1, 1, 2, 2, 3, 6][usize::from(n % 8)];
    let mut edits = Vec::new();
    for _ in 0..count {
        match rest.split_first_chunk::<4>() {
            Some((e, r)) => {
                edits.push(*e);
                rest = r;
            }
            None => break,
        }
    }
    let mut material = rest;
    for [kind, hi, lo, val] in edits {
        let at = usize::from(u16::from_be_bytes([hi, lo]));
        let len = out.len();
        match kind % 9 {
            0 if len > 0 => out[at % len] = val,
            1 if len > 0 => out[at % len] ^= 1 << (val % 8),
            // Nudge a length or count up or down by a little.
            2 if len > 0 => out[at % len] = out[at % len].wrapping_add(val % 16).wrapping_sub(8),
            3 => out.insert(at % (len + 1), val),
            4 if len > 0 => {
                let from = at % len;
                let to = (from + 1 + usize::from(val % 16)).min(len);
                out.drain(from..to);
            }
            5 => out.truncate(at % (len + 1)),
            6 if len > 0 => out[at % len] = INTERESTING[usize::from(val) % INTERESTING.len()],
            7 if len > 0 => {
                // Repeat a stretch (nesting, repeated options or packets).
                let from = at % len;
                let to = (from + 1 + usize::from(val % 64)).min(len);
                let copy = out[from..to].to_vec();
                out.splice(to..to, copy);
            }
            8 => {
                let take = usize::from(val % 64).min(material.len());
                let (splice, r) = material.split_at(take);
                material = r;
                let at = at % (len + 1);
                out.splice(at..at, splice.iter().copied());
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutate_picks_seeds_edits_and_raw_input() {
        let seeds = vec![b"abcd".to_vec(), b"xyz".to_vec()];
        assert_eq!(mutate(&seeds, &[]), b"");
        assert_eq!(mutate(&seeds, &[0]), b"abcd");
        assert_eq!(mutate(&seeds, &[2, 9, 9]), [9, 9]);
        // seed 1, one edit: set byte 1 to '!'
        assert_eq!(mutate(&seeds, &[1, 0, 0, 0, 1, b'!']), b"x!z");
        // seed 0, two edits: truncate to 2, splice 3 bytes of material at 1
        assert_eq!(
            mutate(&seeds, &[0, 4, 5, 0, 2, 0, 8, 0, 1, 3, b'1', b'2', b'3', b'4']),
            b"a123b"
        );
    }
}
