//! JSON payloads → events: the field mapping and the validation that sends a record to
//! the dead letters with a reason.
//!
//! A payload is one JSON object per message, e.g.
//! `{"user_id": 7, "item_id": 42, "event_type": "click", "ts": 1700000000000}`.
//! Ids are unsigned integers (or strings holding one); the event type is a name
//! (`view`, `click`, `cart`, `purchase`) or its code, `view` when absent; the time is an
//! integer in the configured unit, or the Kafka message timestamp when no time field is
//! configured; the weight is optional (1.0).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tidepool_pipeline::{Event, EventType};

/// Default for [`JsonMapping::max_bytes`]: 64 KiB.
pub const DEFAULT_MAX_BYTES: usize = 64 << 10;

/// Unit of an integer time field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    /// Seconds since the epoch.
    S,
    /// Milliseconds since the epoch.
    #[default]
    Ms,
}

impl std::str::FromStr for TimeUnit {
    type Err = tidepool_pipeline::Error;
    fn from_str(s: &str) -> tidepool_pipeline::Result<Self> {
        match s {
            "s" => Ok(TimeUnit::S),
            "ms" => Ok(TimeUnit::Ms),
            other => Err(tidepool_pipeline::Error::Config(format!(
                "unknown time unit {other:?}; valid: s, ms"
            ))),
        }
    }
}

/// How JSON fields map to event columns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JsonMapping {
    /// Field holding the user id.
    pub user: String,
    /// Field holding the item id.
    pub item: String,
    /// Field holding the event time; `None` takes the Kafka message timestamp.
    pub ts: Option<String>,
    /// Unit of an integer time field.
    pub time_unit: TimeUnit,
    /// Field holding the event type.
    pub event_type: String,
    /// Field holding the weight, if any.
    pub weight: Option<String>,
    /// Only these event types are trained on; others are skipped (counted, not dead
    /// letters). Empty: all.
    pub types: Vec<EventType>,
    /// Payloads larger than this are dead letters (`oversized`) without being parsed.
    pub max_bytes: usize,
}

impl Default for JsonMapping {
    fn default() -> Self {
        Self {
            user: "user_id".into(),
            item: "item_id".into(),
            ts: Some("ts".into()),
            time_unit: TimeUnit::Ms,
            event_type: "event_type".into(),
            weight: Some("weight".into()),
            types: Vec::new(),
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// What became of one payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// A valid event.
    Event(Event),
    /// Valid, but of a type the mapping filters out.
    Skipped,
    /// Invalid: the reason, for the dead letter.
    Rejected(String),
}

fn id(v: Option<&Value>, field: &str) -> Result<u64, String> {
    match v {
        None | Some(Value::Null) => Err(format!("missing {field}")),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("{field} must be an unsigned integer, got {n}")),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| format!("{field} must be an unsigned integer, got {s:?}")),
        Some(other) => Err(format!(
            "{field} must be an unsigned integer, got {}",
            kind(other)
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl JsonMapping {
    /// Decodes one payload; `kafka_ts` is the message timestamp (ms), if it has one.
    pub fn decode(&self, payload: Option<&[u8]>, kafka_ts: Option<i64>) -> Decoded {
        match self.try_decode(payload, kafka_ts) {
            Ok(Some(e)) => Decoded::Event(e),
            Ok(None) => Decoded::Skipped,
            Err(reason) => Decoded::Rejected(reason),
        }
    }

    fn try_decode(
        &self,
        payload: Option<&[u8]>,
        kafka_ts: Option<i64>,
    ) -> Result<Option<Event>, String> {
        let bytes = payload.ok_or("empty message (no payload)")?;
        if bytes.len() > self.max_bytes {
            return Err(format!(
                "oversized: {} bytes, the limit is {}",
                bytes.len(),
                self.max_bytes
            ));
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("malformed JSON: {e}"))?;
        let Value::Object(obj) = value else {
            return Err(format!("expected a JSON object, got {}", kind(&value)));
        };
        let user = id(obj.get(&self.user), &self.user)?;
        let item = id(obj.get(&self.item), &self.item)?;
        let kind_value = obj.get(&self.event_type);
        let event_kind = match kind_value {
            None | Some(Value::Null) => EventType::View,
            Some(Value::String(s)) => EventType::from_name(s).ok_or_else(|| {
                format!(
                    "unknown {} {s:?}; valid: view, click, cart, purchase",
                    self.event_type
                )
            })?,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|c| u8::try_from(c).ok())
                .and_then(EventType::from_code)
                .ok_or_else(|| format!("unknown {} code {n}", self.event_type))?,
            Some(other) => {
                return Err(format!(
                    "{} must be a name or a code, got {}",
                    self.event_type,
                    kind(other)
                ))
            }
        };
        let ts = match &self.ts {
            None => kafka_ts.ok_or("the message has no timestamp and no time field is mapped")?,
            Some(field) => {
                let raw = match obj.get(field) {
                    None | Some(Value::Null) => return Err(format!("missing {field}")),
                    Some(Value::Number(n)) => n
                        .as_i64()
                        .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                        .ok_or_else(|| format!("{field} out of range: {n}"))?,
                    Some(other) => {
                        return Err(format!(
                            "{field} must be an integer time, got {}",
                            kind(other)
                        ))
                    }
                };
                match self.time_unit {
                    TimeUnit::Ms => raw,
                    TimeUnit::S => raw
                        .checked_mul(1000)
                        .ok_or_else(|| format!("{field} out of range: {raw} s"))?,
                }
            }
        };
        let weight = match self.weight.as_ref().and_then(|f| obj.get(f)) {
            None | Some(Value::Null) => 1.0,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(w) if w.is_finite() => w as f32,
                _ => return Err(format!("weight out of range: {n}")),
            },
            Some(other) => return Err(format!("weight must be a number, got {}", kind(other))),
        };
        if !self.types.is_empty() && !self.types.contains(&event_kind) {
            return Ok(None);
        }
        Ok(Some(Event {
            ts,
            pos: 0,
            user,
            item,
            weight,
            kind: event_kind,
        }))
    }
}

/// The JSON payload of an event, as `tidepool produce` writes it (the default mapping).
pub fn encode(e: &Event) -> Vec<u8> {
    format!(
        r#"{{"user_id":{},"item_id":{},"event_type":"{}","ts":{},"weight":{}}}"#,
        e.user,
        e.item,
        e.kind.name(),
        e.ts,
        e.weight
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Decoded {
        JsonMapping::default().decode(Some(s.as_bytes()), Some(5))
    }

    #[test]
    fn good_records_round_trip() {
        let e = Event {
            ts: 1_700_000_000_123,
            pos: 0,
            user: 7,
            item: u64::MAX,
            weight: 2.5,
            kind: EventType::Purchase,
        };
        assert_eq!(
            JsonMapping::default().decode(Some(&encode(&e)), None),
            Decoded::Event(e)
        );
        let Decoded::Event(e) = decode(r#"{"user_id":"12","item_id":3,"ts":10}"#) else {
            panic!()
        };
        assert_eq!(
            (e.user, e.item, e.kind, e.weight),
            (12, 3, EventType::View, 1.0)
        );
    }

    #[test]
    fn every_bad_record_says_why() {
        for (payload, reason) in [
            ("{\"user_id\":1,", "malformed JSON"),
            ("[1,2]", "expected a JSON object, got an array"),
            (r#"{"item_id":1,"ts":1}"#, "missing user_id"),
            (
                r#"{"user_id":-1,"item_id":1,"ts":1}"#,
                "user_id must be an unsigned integer",
            ),
            (
                r#"{"user_id":1.5,"item_id":1,"ts":1}"#,
                "user_id must be an unsigned integer",
            ),
            (
                r#"{"user_id":"bob","item_id":1,"ts":1}"#,
                "user_id must be an unsigned integer, got \"bob\"",
            ),
            (
                r#"{"user_id":1,"item_id":[],"ts":1}"#,
                "item_id must be an unsigned integer, got an array",
            ),
            (r#"{"user_id":1,"item_id":1}"#, "missing ts"),
            (
                r#"{"user_id":1,"item_id":1,"ts":"yesterday"}"#,
                "ts must be an integer time, got a string",
            ),
            (
                r#"{"user_id":1,"item_id":1,"ts":1,"event_type":"like"}"#,
                "unknown event_type \"like\"",
            ),
            (
                r#"{"user_id":1,"item_id":1,"ts":1,"weight":"heavy"}"#,
                "weight must be a number",
            ),
        ] {
            match decode(payload) {
                Decoded::Rejected(r) => assert!(r.contains(reason), "{payload}: {r}"),
                other => panic!("{payload}: {other:?}"),
            }
        }
        assert_eq!(
            JsonMapping::default().decode(None, None),
            Decoded::Rejected("empty message (no payload)".into())
        );
        let big = format!(
            r#"{{"user_id":1,"item_id":1,"ts":1,"pad":"{}"}}"#,
            "x".repeat(70_000)
        );
        assert!(matches!(decode(&big), Decoded::Rejected(r) if r.starts_with("oversized")));
    }

    #[test]
    fn mapping_options() {
        let m = JsonMapping {
            user: "u".into(),
            item: "i".into(),
            ts: None,
            types: vec![EventType::Purchase],
            ..JsonMapping::default()
        };
        assert_eq!(
            m.decode(Some(br#"{"u":1,"i":2,"event_type":"view"}"#), Some(99)),
            Decoded::Skipped
        );
        let Decoded::Event(e) = m.decode(Some(br#"{"u":1,"i":2,"event_type":3}"#), Some(99)) else {
            panic!()
        };
        assert_eq!((e.ts, e.kind), (99, EventType::Purchase));
        let secs = JsonMapping {
            time_unit: TimeUnit::S,
            ..JsonMapping::default()
        };
        let Decoded::Event(e) = secs.decode(Some(br#"{"user_id":1,"item_id":2,"ts":3}"#), None)
        else {
            panic!()
        };
        assert_eq!(e.ts, 3000);
    }
}
