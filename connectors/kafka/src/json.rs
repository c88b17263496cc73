//! JSON payloads → events: the field mapping and the validation that sends a record to
//! the dead letters with a reason.
//!
//! A payload is one JSON object per message, e.g.
//! `{"user_id": 7, "item_id": 42, "event_type": "click", "ts": 1700000000000}`.
//! Ids are unsigned integers (or strings holding one); the event type is a name
//! (`view`, `click`, `cart`, `purchase`) or its code, `view` when absent; the time is an
//! integer in the configured unit, or the Kafka message timestamp when no time field is
//! configured; the weight is optional (1.0).

use std::borrow::Cow;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
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

/// A JSON value as far as the mapping cares: numbers and strings kept (strings borrowed
/// from the payload when they have no escapes), everything else only by kind. Decoding
/// into this instead of `serde_json::Value` skips building a map per message.
#[derive(Debug)]
enum Scalar<'a> {
    Null,
    Bool,
    U64(u64),
    I64(i64),
    F64(f64),
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl std::fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::U64(n) => write!(f, "{n}"),
            Scalar::I64(n) => write!(f, "{n}"),
            Scalar::F64(n) => write!(f, "{n}"),
            other => f.write_str(other.kind()),
        }
    }
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool => "a boolean",
            Scalar::U64(_) | Scalar::I64(_) | Scalar::F64(_) => "a number",
            Scalar::Str(_) => "a string",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }

    fn is_number(&self) -> bool {
        matches!(self, Scalar::U64(_) | Scalar::I64(_) | Scalar::F64(_))
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::U64(n) => Some(*n),
            _ => None,
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match self {
            Scalar::U64(n) => i64::try_from(*n).ok(),
            Scalar::I64(n) => Some(*n),
            // `as` saturates: a float beyond the range would become i64::MIN or MAX
            // instead of an error. -2^63 (i64::MIN) is exact as f64; i64's range is [-2^63, 2^63).
            Scalar::F64(n) if (i64::MIN as f64..-(i64::MIN as f64)).contains(n) => Some(*n as i64),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::U64(n) => Some(*n as f64),
            Scalar::I64(n) => Some(*n as f64),
            Scalar::F64(n) => Some(*n),
            _ => None,
        }
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool)
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::U64(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(if v >= 0 {
            Scalar::U64(v as u64)
        } else {
            Scalar::I64(v)
        })
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::F64(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Object)
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// The mapped fields of one payload object.
#[derive(Default)]
struct Fields<'a> {
    user: Option<Scalar<'a>>,
    item: Option<Scalar<'a>>,
    kind: Option<Scalar<'a>>,
    ts: Option<Scalar<'a>>,
    weight: Option<Scalar<'a>>,
}

/// Reads a payload object, keeping only the fields the mapping names.
struct FieldsSeed<'m>(&'m JsonMapping);

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_> {
    type Value = Fields<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_> {
    type Value = Fields<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let m = self.0;
        let mut out = Fields::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = if key == m.user.as_str() {
                &mut out.user
            } else if key == m.item.as_str() {
                &mut out.item
            } else if key == m.event_type.as_str() {
                &mut out.kind
            } else if m.ts.as_deref() == Some(&*key) {
                &mut out.ts
            } else if m.weight.as_deref() == Some(&*key) {
                &mut out.weight
            } else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            *slot = Some(map.next_value()?);
        }
        Ok(out)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(NOT_OBJECT_ARRAY))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::custom("expected a JSON object, got a string"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(E::custom("expected a JSON object, got a number"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(E::custom("expected a JSON object, got a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom("expected a JSON object, got a number"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom("expected a JSON object, got a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom("expected a JSON object, got null"))
    }
}

const NOT_OBJECT_ARRAY: &str = "expected a JSON object, got an array";

fn id(v: Option<&Scalar<'_>>, field: &str) -> Result<u64, String> {
    match v {
        None | Some(Scalar::Null) => Err(format!("missing {field}")),
        Some(n) if n.is_number() => n
            .as_u64()
            .ok_or_else(|| format!("{field} must be an unsigned integer, got {n}")),
        Some(Scalar::Str(s)) => s
            .parse()
            .map_err(|_| format!("{field} must be an unsigned integer, got {s:?}")),
        Some(other) => Err(format!(
            "{field} must be an unsigned integer, got {}",
            other.kind()
        )),
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
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let obj = FieldsSeed(self)
            .deserialize(&mut de)
            .and_then(|f| de.end().map(|()| f))
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => {
                    let msg = e.to_string();
                    match msg.find(" at line ") {
                        Some(i) => msg[..i].to_string(),
                        None => msg,
                    }
                }
                _ => format!("malformed JSON: {e}"),
            })?;
        let user = id(obj.user.as_ref(), &self.user)?;
        let item = id(obj.item.as_ref(), &self.item)?;
        let event_kind = match &obj.kind {
            None | Some(Scalar::Null) => EventType::View,
            Some(Scalar::Str(s)) => EventType::from_name(s).ok_or_else(|| {
                format!(
                    "unknown {} {s:?}; valid: view, click, cart, purchase, rating",
                    self.event_type
                )
            })?,
            Some(n) if n.is_number() => n
                .as_u64()
                .and_then(|c| u8::try_from(c).ok())
                .and_then(EventType::from_code)
                .ok_or_else(|| format!("unknown {} code {n}", self.event_type))?,
            Some(other) => {
                return Err(format!(
                    "{} must be a name or a code, got {}",
                    self.event_type,
                    other.kind()
                ))
            }
        };
        let ts = match &self.ts {
            None => kafka_ts.ok_or("the message has no timestamp and no time field is mapped")?,
            Some(field) => {
                let raw = match &obj.ts {
                    None | Some(Scalar::Null) => return Err(format!("missing {field}")),
                    Some(n) if n.is_number() => n
                        .as_i64()
                        .ok_or_else(|| format!("{field} out of range: {n}"))?,
                    Some(other) => {
                        return Err(format!(
                            "{field} must be an integer time, got {}",
                            other.kind()
                        ))
                    }
                };
                let ms = match self.time_unit {
                    TimeUnit::Ms => Some(raw),
                    TimeUnit::S => raw.checked_mul(1000),
                };
                // i64::MIN is the sources' "nothing delivered yet" watermark, never a time.
                match ms {
                    Some(ms) if ms != i64::MIN => ms,
                    _ => {
                        let unit = match self.time_unit {
                            TimeUnit::Ms => "ms",
                            TimeUnit::S => "s",
                        };
                        return Err(format!("{field} out of range: {raw} {unit}"));
                    }
                }
            }
        };
        let weight = match &obj.weight {
            None | Some(Scalar::Null) => 1.0,
            Some(n) if n.is_number() => match n.as_f64() {
                Some(w) if w.is_finite() => w as f32,
                _ => return Err(format!("weight out of range: {n}")),
            },
            Some(other) => return Err(format!("weight must be a number, got {}", other.kind())),
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
                r#"{"user_id":1,"item_id":1,"ts":-4.665185177847528e83}"#,
                "ts out of range",
            ),
            (
                r#"{"user_id":1,"item_id":1,"ts":-9223372036854775808}"#,
                "ts out of range",
            ),
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
