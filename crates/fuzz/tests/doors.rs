//! The fuzz targets (crates/fuzz/src/targets.rs), one test each.
//!
//! Under `cargo test` / `cargo nextest` each runs its seeds, then random
//! inputs for `BOLERO_RANDOM_TEST_TIME_MS` (default here: 2 s) or
//! `BOLERO_RANDOM_ITERATIONS`; a failure prints `BOLERO_RANDOM_SEED=…` to
//! replay it. `cargo bolero test <name> -p weft-fuzz --toolchain nightly`
//! runs the same target coverage-guided (see docs/fuzzing.md).

use std::time::Duration;

/// Time each target gets per run unless the environment says otherwise.
const DEFAULT_TIME: Duration = Duration::from_secs(2);

/// Every seed unchanged (a one-byte input picks a seed and edits nothing),
/// before the random part: the invariants hold on real packets.
fn seeds_pass(count: usize, target: impl Fn(&[u8])) {
    for i in 0..count {
        target(&[i as u8]);
    }
}

#[test]
fn mqtt_packets() {
    seeds_pass(weft_fuzz::seeds::mqtt().len(), weft_fuzz::mqtt);
    bolero::check!().with_test_time(DEFAULT_TIME).for_each(weft_fuzz::mqtt);
}

#[test]
fn coap_datagrams() {
    seeds_pass(weft_fuzz::seeds::coap().len(), weft_fuzz::coap);
    bolero::check!().with_test_time(DEFAULT_TIME).for_each(weft_fuzz::coap);
}

#[test]
fn coap_requests() {
    let server = weft_fuzz::Server::start();
    // A panic ends the test; nothing observes the server after one.
    let server = std::panic::AssertUnwindSafe(&server);
    let target = move |input: &[u8]| {
        let server = &server; // the whole wrapper, not just its field
        weft_fuzz::coap_requests(server.0, input)
    };
    seeds_pass(weft_fuzz::seeds::coap().len(), &target);
    bolero::check!().with_test_time(DEFAULT_TIME).for_each(target);
}

#[test]
fn cbor_items() {
    seeds_pass(weft_fuzz::seeds::cbor().len(), weft_fuzz::cbor);
    bolero::check!().with_test_time(DEFAULT_TIME).for_each(weft_fuzz::cbor);
}

#[test]
fn door_payloads() {
    seeds_pass(weft_fuzz::seeds::door_content().len(), weft_fuzz::door_content);
    bolero::check!()
        .with_test_time(DEFAULT_TIME)
        .for_each(weft_fuzz::door_content);
}
