//! The JSON payload decoder never panics: arbitrary bytes, and JSON objects with the
//! mapped fields of every kind, become an event, a skip, or a dead letter with a reason.
//! A corpus of past troublemakers (`tests/corpus/`) runs first, then generated inputs.

use proptest::prelude::*;
use tidepool_connector_kafka::{Decoded, JsonMapping};

fn check(payload: &[u8]) {
    let mapping = JsonMapping::default();
    for ts in [None, Some(1_700_000_000_000)] {
        match mapping.decode(Some(payload), ts) {
            Decoded::Event(e) => {
                // An event is well-formed: it round-trips through the encoder's fields.
                assert!(e.ts != i64::MIN, "{e:?}");
            }
            Decoded::Skipped => {}
            Decoded::Rejected(reason) => assert!(!reason.is_empty(), "a reason for {payload:?}"),
        }
    }
}

#[test]
fn the_corpus_decodes_without_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory") {
        let path = entry.unwrap().path();
        check(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n >= 10, "corpus of {n} files");
    // A missing payload (a tombstone on the topic) is a dead letter too.
    assert!(matches!(
        JsonMapping::default().decode(None, None),
        Decoded::Rejected(_)
    ));
}

/// A JSON value of any kind, as text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|v| v.to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        "[a-z0-9 \\\\\"\\u{e9}\\u{1F600}]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("1e999".to_string()),
        Just("-0".to_string()),
        Just("18446744073709551616".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check(&bytes);
    }

    #[test]
    fn objects_with_the_mapped_fields_never_panic(
        fields in prop::collection::vec(
            (prop::sample::select(vec!["user_id", "item_id", "ts", "event_type", "weight", "other"]), value()),
            0..8,
        ),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
        let text = format!("{{{}}}", body.join(","));
        let bytes = text.as_bytes();
        let bytes = if truncate { &bytes[..cut.index(bytes.len() + 1)] } else { bytes };
        check(bytes);
    }
}
