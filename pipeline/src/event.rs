//! The behaviour event: its Arrow schema, its compact in-dataflow form, and the decoder
//! between the two.
//!
//! Sources hand over Arrow `RecordBatch`es with the canonical column names
//! ([`USER_ID`], [`ITEM_ID`], [`EVENT_TYPE`], [`TS`], [`WEIGHT`]); [`decode_events`]
//! validates them row by row into [`Event`]s, the 40-byte `Copy` form that timely moves
//! between workers. Rows that fail validation become [`DeadLetter`]s with a reason: the
//! decoder never panics on data and never drops a row without saying so.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int32Type, Int64Type, Int8Type, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{
    Array, ArrayRef, Float32Array, RecordBatch, TimestampMillisecondArray, UInt64Array, UInt8Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};

/// Column name of the user id (u64).
pub const USER_ID: &str = "user_id";
/// Column name of the item id (u64).
pub const ITEM_ID: &str = "item_id";
/// Column name of the event type (u8 code or dictionary string).
pub const EVENT_TYPE: &str = "event_type";
/// Column name of the event time (timestamp, milliseconds since the Unix epoch).
pub const TS: &str = "ts";
/// Column name of the optional weight (f32, e.g. a rating).
pub const WEIGHT: &str = "weight";
/// Column name of the optional replay position (u64), for sources whose records are not
/// numbered by their row (Kafka: partition and offset). Without it, row r of a batch has
/// position `first_pos + r`.
pub const POS: &str = "_tidepool_pos";

/// What the user did. Stored as a `u8` code in Arrow and Parquet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum EventType {
    /// Looked at the item.
    #[default]
    View = 0,
    /// Clicked it.
    Click = 1,
    /// Put it in the cart.
    Cart = 2,
    /// Bought it.
    Purchase = 3,
    /// Rated it (the rating is the weight).
    Rating = 4,
}

impl EventType {
    /// All event types, in code order.
    pub const ALL: [EventType; 5] = [
        EventType::View,
        EventType::Click,
        EventType::Cart,
        EventType::Purchase,
        EventType::Rating,
    ];

    /// The type with this code, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(code as usize).copied()
    }

    /// The lowercase name (`view`, `click`, `cart`, `purchase`, `rating`).
    pub fn name(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Click => "click",
            EventType::Cart => "cart",
            EventType::Purchase => "purchase",
            EventType::Rating => "rating",
        }
    }

    /// Parses a name as written by [`EventType::name`], case-insensitively.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }
}

/// One behaviour event in the compact form the dataflow moves around.
///
/// `pos` is the event's position in its source (file index and row, or generator
/// sequence number). Together with `ts` it gives every event a unique, worker-count
/// independent place in the replay order: `(ts, pos)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event time, milliseconds since the Unix epoch.
    pub ts: i64,
    /// Position in the source; breaks ties between equal timestamps.
    pub pos: u64,
    /// User id.
    pub user: u64,
    /// Item id.
    pub item: u64,
    /// Weight (rating, quantity); 1.0 when the source has none.
    pub weight: f32,
    /// What happened.
    pub kind: EventType,
}

impl Event {
    /// The replay-order key.
    #[inline]
    pub fn key(&self) -> (i64, u64) {
        (self.ts, self.pos)
    }
}

/// The canonical event schema that tidepool writes (one shared instance: every batch a
/// source builds refers to it instead of allocating its own).
pub fn event_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    Arc::clone(SCHEMA.get_or_init(build_event_schema))
}

fn build_event_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(USER_ID, DataType::UInt64, false),
        Field::new(ITEM_ID, DataType::UInt64, false),
        Field::new(EVENT_TYPE, DataType::UInt8, false),
        Field::new(
            TS,
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new(WEIGHT, DataType::Float32, true),
    ]))
}

/// Builds a canonical batch from events, with its columns in `pool` (the `pos` field is
/// not stored: it is the row's position in the source).
pub fn events_batch(events: &[Event], pool: &crate::BufferPool) -> Result<RecordBatch> {
    let n = events.len();
    let (mut users, mut items, mut kinds, mut times, mut weights) = (
        pool.vec::<u64>(n),
        pool.vec::<u64>(n),
        pool.vec::<u8>(n),
        pool.vec::<i64>(n),
        pool.vec::<f32>(n),
    );
    for e in events {
        users.push(e.user);
        items.push(e.item);
        kinds.push(e.kind as u8);
        times.push(e.ts);
        weights.push(e.weight);
    }
    RecordBatch::try_new(
        event_schema(),
        vec![
            Arc::new(UInt64Array::new(users.into_scalar(), None)),
            Arc::new(UInt64Array::new(items.into_scalar(), None)),
            Arc::new(UInt8Array::new(kinds.into_scalar(), None)),
            Arc::new(
                TimestampMillisecondArray::new(times.into_scalar(), None).with_timezone("UTC"),
            ),
            Arc::new(Float32Array::new(weights.into_scalar(), None)),
        ],
    )
    .map_err(|e| Error::Internal(format!("building an event batch: {e}")))
}

/// Like [`events_batch`], with each event's own `pos` in a [`POS`] column: for sources
/// whose positions are not consecutive rows (Kafka's partition and offset), so that the
/// replay order `(ts, pos)` survives the trip through Arrow.
pub fn events_batch_with_positions(
    events: &[Event],
    pool: &crate::BufferPool,
) -> Result<RecordBatch> {
    let batch = events_batch(events, pool)?;
    let mut positions = pool.vec::<u64>(events.len());
    events.iter().for_each(|e| positions.push(e.pos));
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(POS, DataType::UInt64, false));
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(UInt64Array::new(positions.into_scalar(), None)));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::Internal(format!("building an event batch: {e}")))
}

/// Where a batch came from, so dead letters can name the row.
#[derive(Clone, Debug)]
pub struct BatchOrigin {
    /// File path or source name.
    pub source: Arc<str>,
    /// Row number (0-based, within the source) of the batch's first row.
    pub first_row: u64,
    /// Replay position of the batch's first row; row `r` has position `first_pos + r`.
    pub first_pos: u64,
}

/// Integer id column, read without copying whatever integer type the file uses.
enum IdColumn<'a> {
    U64(&'a arrow_array::PrimitiveArray<UInt64Type>),
    I64(&'a arrow_array::PrimitiveArray<Int64Type>),
    U32(&'a arrow_array::PrimitiveArray<UInt32Type>),
    I32(&'a arrow_array::PrimitiveArray<Int32Type>),
}

impl<'a> IdColumn<'a> {
    fn new(name: &str, array: &'a ArrayRef) -> Result<Self> {
        Ok(match array.data_type() {
            DataType::UInt64 => IdColumn::U64(array.as_primitive()),
            DataType::Int64 => IdColumn::I64(array.as_primitive()),
            DataType::UInt32 => IdColumn::U32(array.as_primitive()),
            DataType::Int32 => IdColumn::I32(array.as_primitive()),
            other => {
                return Err(Error::Config(format!(
                    "column {name} has type {other}; expected an integer type (u64, i64, u32, i32)"
                )))
            }
        })
    }

    fn get(&self, row: usize) -> Result<u64, &'static str> {
        let (valid, value) = match self {
            IdColumn::U64(a) => (a.is_valid(row), Ok(a.value(row))),
            IdColumn::U32(a) => (a.is_valid(row), Ok(a.value(row) as u64)),
            IdColumn::I64(a) => (a.is_valid(row), u64::try_from(a.value(row))),
            IdColumn::I32(a) => (a.is_valid(row), u64::try_from(a.value(row))),
        };
        if !valid {
            return Err("is null");
        }
        value.map_err(|_| "is negative")
    }
}

/// Timestamp column in any unit, read as milliseconds.
struct TsColumn<'a> {
    values: &'a [i64],
    nulls: Option<&'a arrow_buffer::NullBuffer>,
    /// Multiply (positive) or divide (negative) to get milliseconds.
    scale: i64,
}

impl<'a> TsColumn<'a> {
    fn new(array: &'a ArrayRef) -> Result<Self> {
        let (values, scale): (&[i64], i64) = match array.data_type() {
            DataType::Timestamp(TimeUnit::Second, _) => {
                (array.as_primitive::<TimestampSecondType>().values(), 1000)
            }
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                (array.as_primitive::<TimestampMillisecondType>().values(), 1)
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => (
                array.as_primitive::<TimestampMicrosecondType>().values(),
                -1000,
            ),
            DataType::Timestamp(TimeUnit::Nanosecond, _) => (
                array.as_primitive::<TimestampNanosecondType>().values(),
                -1_000_000,
            ),
            DataType::Int64 => (array.as_primitive::<Int64Type>().values(), 1),
            other => {
                return Err(Error::Config(format!(
                    "column {TS} has type {other}; expected a timestamp or i64 milliseconds"
                )))
            }
        };
        Ok(TsColumn {
            values,
            nulls: array.nulls(),
            scale,
        })
    }

    fn get(&self, row: usize) -> Result<i64, &'static str> {
        if self.nulls.is_some_and(|n| n.is_null(row)) {
            return Err("is null");
        }
        let v = self.values[row];
        if self.scale >= 0 {
            v.checked_mul(self.scale).ok_or("overflows milliseconds")
        } else {
            Ok(v.div_euclid(-self.scale))
        }
    }
}

/// Event type column: u8 codes or strings (plain or dictionary encoded).
enum KindColumn<'a> {
    Missing,
    Code(&'a arrow_array::PrimitiveArray<UInt8Type>),
    Names(
        Vec<Option<EventType>>,
        Vec<usize>,
        Option<&'a arrow_buffer::NullBuffer>,
    ),
}

impl<'a> KindColumn<'a> {
    fn new(array: Option<&'a ArrayRef>) -> Result<Self> {
        let Some(array) = array else {
            return Ok(KindColumn::Missing);
        };
        let names_of = |values: &dyn Array| -> Result<Vec<Option<EventType>>> {
            let strings = values.as_string_opt::<i32>().ok_or_else(|| {
                Error::Config(format!(
                    "column {EVENT_TYPE} has dictionary values of type {}; expected strings",
                    values.data_type()
                ))
            })?;
            Ok(strings
                .iter()
                .map(|s| s.and_then(EventType::from_name))
                .collect())
        };
        Ok(match array.data_type() {
            DataType::UInt8 => KindColumn::Code(array.as_primitive()),
            DataType::Utf8 => {
                let names = names_of(array.as_ref())?;
                let keys = (0..array.len()).collect();
                KindColumn::Names(names, keys, array.nulls())
            }
            DataType::Dictionary(key, _) => {
                macro_rules! dict {
                    ($t:ty) => {{
                        let dict = array.as_dictionary::<$t>();
                        let names = names_of(dict.values().as_ref())?;
                        let keys = dict.keys().values().iter().map(|&k| k as usize).collect();
                        KindColumn::Names(names, keys, array.nulls())
                    }};
                }
                match key.as_ref() {
                    DataType::Int8 => dict!(Int8Type),
                    DataType::UInt8 => dict!(UInt8Type),
                    DataType::UInt16 => dict!(UInt16Type),
                    DataType::Int32 => dict!(Int32Type),
                    other => {
                        return Err(Error::Config(format!(
                            "column {EVENT_TYPE} is a dictionary keyed by {other}; expected i8, u8, u16 or i32 keys"
                        )))
                    }
                }
            }
            other => {
                return Err(Error::Config(format!(
                    "column {EVENT_TYPE} has type {other}; expected u8 codes or strings"
                )))
            }
        })
    }

    fn get(&self, row: usize) -> Result<EventType, &'static str> {
        match self {
            KindColumn::Missing => Ok(EventType::View),
            KindColumn::Code(a) => {
                if a.is_null(row) {
                    return Err("is null");
                }
                EventType::from_code(a.value(row)).ok_or("is not a known event type code (0-4)")
            }
            KindColumn::Names(names, keys, nulls) => {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    return Err("is null");
                }
                names
                    .get(keys[row])
                    .copied()
                    .flatten()
                    .ok_or("is not one of view, click, cart, purchase, rating")
            }
        }
    }
}

/// Weight column: f32 or f64; null means 1.0.
enum WeightColumn<'a> {
    Missing,
    F32(&'a arrow_array::PrimitiveArray<Float32Type>),
    F64(&'a arrow_array::PrimitiveArray<Float64Type>),
}

impl WeightColumn<'_> {
    fn get(&self, row: usize) -> Result<f32, &'static str> {
        let w = match self {
            WeightColumn::Missing => return Ok(1.0),
            WeightColumn::F32(a) if a.is_valid(row) => a.value(row),
            WeightColumn::F64(a) if a.is_valid(row) => a.value(row) as f32,
            _ => return Ok(1.0),
        };
        if w.is_finite() {
            Ok(w)
        } else {
            Err("is not a finite number")
        }
    }
}

/// Checks that a batch has the columns and types [`decode_events`] needs, so a wrong file
/// fails once with a clear message instead of dead-lettering every row.
pub fn check_schema(schema: &Schema) -> Result<()> {
    for name in [USER_ID, ITEM_ID, TS] {
        if schema.field_with_name(name).is_err() {
            let found: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(Error::Config(format!(
                "required column {name} is missing (columns: {})",
                found.join(", ")
            )));
        }
    }
    Ok(())
}

/// Decodes a batch with canonical column names into events, appending to `out`.
///
/// Rows that fail validation go to `dead` with their reason; the function returns how
/// many rows were dead-lettered. A batch whose *schema* is wrong is an error: that is a
/// configuration problem, not a bad record.
pub fn decode_events(
    batch: &RecordBatch,
    origin: &BatchOrigin,
    out: &mut Vec<Event>,
    dead: &mut dyn FnMut(DeadLetter),
) -> Result<u64> {
    check_schema(&batch.schema())?;
    let column = |name: &str| batch.column_by_name(name);
    let missing = |name: &str| Error::Internal(format!("column {name} vanished after check"));
    let users = IdColumn::new(USER_ID, column(USER_ID).ok_or_else(|| missing(USER_ID))?)?;
    let items = IdColumn::new(ITEM_ID, column(ITEM_ID).ok_or_else(|| missing(ITEM_ID))?)?;
    let ts = TsColumn::new(column(TS).ok_or_else(|| missing(TS))?)?;
    let kinds = KindColumn::new(column(EVENT_TYPE))?;
    let weights = match column(WEIGHT) {
        None => WeightColumn::Missing,
        Some(a) => match a.data_type() {
            DataType::Float32 => WeightColumn::F32(a.as_primitive()),
            DataType::Float64 => WeightColumn::F64(a.as_primitive()),
            DataType::Null => WeightColumn::Missing,
            other => {
                return Err(Error::Config(format!(
                    "column {WEIGHT} has type {other}; expected f32 or f64"
                )))
            }
        },
    };

    let positions = match column(POS) {
        None => None,
        Some(a) => Some(a.as_primitive_opt::<UInt64Type>().ok_or_else(|| {
            Error::Config(format!(
                "column {POS} has type {}; expected u64",
                a.data_type()
            ))
        })?),
    };
    out.reserve(batch.num_rows());
    let mut bad = 0;
    for row in 0..batch.num_rows() {
        let decoded = (|| {
            Ok::<_, String>(Event {
                user: users.get(row).map_err(|r| format!("{USER_ID} {r}"))?,
                item: items.get(row).map_err(|r| format!("{ITEM_ID} {r}"))?,
                ts: ts.get(row).map_err(|r| format!("{TS} {r}"))?,
                kind: kinds.get(row).map_err(|r| format!("{EVENT_TYPE} {r}"))?,
                weight: weights.get(row).map_err(|r| format!("{WEIGHT} {r}"))?,
                pos: match positions {
                    Some(p) if p.is_valid(row) => p.value(row),
                    Some(_) => return Err(format!("{POS} is null")),
                    None => origin.first_pos + row as u64,
                },
            })
        })();
        match decoded {
            Ok(event) => out.push(event),
            Err(reason) => {
                bad += 1;
                dead(DeadLetter {
                    location: format!("{} row {}", origin.source, origin.first_row + row as u64),
                    reason,
                    raw: None,
                });
            }
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{
        DictionaryArray, Float64Array, Int64Array, StringArray, TimestampSecondArray, UInt64Array,
    };

    fn origin() -> BatchOrigin {
        BatchOrigin {
            source: "test".into(),
            first_row: 100,
            first_pos: 7,
        }
    }

    #[test]
    fn decodes_other_integer_and_time_types() {
        let batch = RecordBatch::try_from_iter(vec![
            (
                USER_ID,
                Arc::new(Int64Array::from(vec![1, -2, 3])) as ArrayRef,
            ),
            (
                ITEM_ID,
                Arc::new(UInt64Array::from(vec![10, 20, 30])) as ArrayRef,
            ),
            (
                TS,
                Arc::new(TimestampSecondArray::from(vec![5, 6, 7])) as ArrayRef,
            ),
            (
                EVENT_TYPE,
                Arc::new(StringArray::from(vec!["view", "Purchase", "nope"])) as ArrayRef,
            ),
            (
                WEIGHT,
                Arc::new(Float64Array::from(vec![Some(4.5), None, Some(1.0)])) as ArrayRef,
            ),
        ])
        .unwrap();
        let mut out = Vec::new();
        let mut dead = Vec::new();
        let bad = decode_events(&batch, &origin(), &mut out, &mut |d| dead.push(d)).unwrap();
        assert_eq!(bad, 2);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0],
            Event {
                ts: 5000,
                pos: 7,
                user: 1,
                item: 10,
                weight: 4.5,
                kind: EventType::View
            }
        );
        assert_eq!(dead[0].location, "test row 101");
        assert_eq!(dead[0].reason, "user_id is negative");
        assert_eq!(
            dead[1].reason,
            format!("{EVENT_TYPE} is not one of view, click, cart, purchase, rating")
        );
    }

    #[test]
    fn dictionary_event_types_and_nulls() {
        let kinds: DictionaryArray<Int32Type> = vec![Some("cart"), None, Some("click")]
            .into_iter()
            .collect();
        let batch = RecordBatch::try_from_iter(vec![
            (
                USER_ID,
                Arc::new(UInt64Array::from(vec![Some(1), Some(2), None])) as ArrayRef,
            ),
            (
                ITEM_ID,
                Arc::new(UInt64Array::from(vec![10, 20, 30])) as ArrayRef,
            ),
            (TS, Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
            (EVENT_TYPE, Arc::new(kinds) as ArrayRef),
        ])
        .unwrap();
        let mut out = Vec::new();
        let mut reasons = Vec::new();
        decode_events(&batch, &origin(), &mut out, &mut |d| reasons.push(d.reason)).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, EventType::Cart);
        assert_eq!(reasons, vec!["event_type is null", "user_id is null"]);
    }

    #[test]
    fn wrong_schema_is_an_error_not_dead_letters() {
        let batch = RecordBatch::try_from_iter(vec![(
            USER_ID,
            Arc::new(UInt64Array::from(vec![1])) as ArrayRef,
        )])
        .unwrap();
        let err = decode_events(&batch, &origin(), &mut Vec::new(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("item_id is missing"), "{err}");
        let batch = RecordBatch::try_from_iter(vec![
            (USER_ID, Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
            (ITEM_ID, Arc::new(UInt64Array::from(vec![1])) as ArrayRef),
            (TS, Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ])
        .unwrap();
        let err = decode_events(&batch, &origin(), &mut Vec::new(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("expected an integer"), "{err}");
    }

    #[test]
    fn event_is_compact() {
        assert_eq!(std::mem::size_of::<Event>(), 40);
    }
}
