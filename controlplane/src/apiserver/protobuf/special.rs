//! Types whose JSON form is not the object of their protobuf fields: timestamps,
//! durations, quantities, int-or-string, and the embedded-JSON carriers.
//!
//! Each decoder follows what Go's apimachinery does when it unmarshals the message
//! and marshals the result to JSON. Errors are short details; the caller adds where.

use base64::Engine as _;
use serde_json::Value;

use super::envelope::MAGIC;
use super::wire::{Reader, WireType};

/// First and last-plus-one second of the years 0000..=9999, the range Go's RFC 3339
/// marshalling accepts.
const MIN_SECOND: i64 = -62_167_219_200;
const END_SECOND: i64 = 253_402_300_800;

/// What a RawExtension holds, once we know which.
pub(super) enum Raw<'a> {
    Json(Value),
    /// A nested protobuf object (starts with [`MAGIC`]); the caller decodes it.
    Protobuf(&'a [u8]),
}

/// `meta.v1.Time`: RFC 3339 in UTC with whole seconds. An empty message is Go's zero
/// time, which marshals as `null`. Go drops the nanoseconds when it unmarshals.
pub(super) fn time(bytes: &[u8], unknown: &mut Vec<u32>) -> Result<Value, String> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let (seconds, _nanos) = seconds_nanos(bytes, unknown)?;
    Ok(Value::String(format!("{}Z", civil(seconds)?)))
}

/// `meta.v1.MicroTime`: RFC 3339 in UTC with exactly six fractional digits.
pub(super) fn micro_time(bytes: &[u8], unknown: &mut Vec<u32>) -> Result<Value, String> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let (seconds, nanos) = seconds_nanos(bytes, unknown)?;
    // Go normalises nanoseconds outside 0..1e9 into the seconds, then truncates.
    let total = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
    let seconds = i64::try_from(total.div_euclid(1_000_000_000))
        .map_err(|_| format!("MicroTime {seconds}s {nanos}ns is out of range"))?;
    let micros = total.rem_euclid(1_000_000_000) / 1000;
    Ok(Value::String(format!("{}.{micros:06}Z", civil(seconds)?)))
}

/// `meta.v1.Duration`: nanoseconds, marshalled like Go's `time.Duration.String()`.
pub(super) fn duration(bytes: &[u8], unknown: &mut Vec<u32>) -> Result<Value, String> {
    let mut nanos = 0i64;
    fields(bytes, unknown, |number, wire, r| match number {
        1 => {
            expect_wire(number, wire, WireType::Varint, "Duration")?;
            nanos = r.varint().map_err(|e| e.to_string())? as i64;
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(Value::String(go_duration(nanos)))
}

/// `intstr.IntOrString`: a JSON number or string depending on its type field.
pub(super) fn int_or_string(bytes: &[u8], unknown: &mut Vec<u32>) -> Result<Value, String> {
    let (mut kind, mut int_val, mut str_val) = (0i64, 0i32, String::new());
    fields(bytes, unknown, |number, wire, r| {
        match number {
            1 => {
                expect_wire(number, wire, WireType::Varint, "IntOrString")?;
                kind = r.varint().map_err(|e| e.to_string())? as i64;
            }
            2 => {
                expect_wire(number, wire, WireType::Varint, "IntOrString")?;
                // int32 on the wire is a sign-extended varint; Go truncates likewise.
                int_val = r.varint().map_err(|e| e.to_string())? as i32;
            }
            3 => {
                expect_wire(number, wire, WireType::Len, "IntOrString")?;
                str_val = utf8(r, 3, "IntOrString")?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    match kind {
        0 => Ok(Value::from(int_val)),
        1 => Ok(Value::String(str_val)),
        other => Err(format!(
            "IntOrString type {other} is neither 0 (int) nor 1 (string)"
        )),
    }
}

/// `resource.Quantity`: its string form. Absent means Go's zero quantity, "0".
/// The grammar is left to validation, which treats JSON and protobuf alike.
pub(super) fn quantity(bytes: &[u8], unknown: &mut Vec<u32>) -> Result<Value, String> {
    let mut text = None;
    fields(bytes, unknown, |number, wire, r| match number {
        1 => {
            expect_wire(number, wire, WireType::Len, "Quantity")?;
            text = Some(utf8(r, 1, "Quantity")?);
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(Value::String(text.unwrap_or_else(|| "0".to_owned())))
}

/// `meta.v1.FieldsV1`: raw JSON bytes (managedFields' fieldsV1).
pub(super) fn fields_v1(bytes: &[u8], unknown: &mut Vec<u32>) -> Result<Value, String> {
    match raw_bytes(bytes, unknown, "FieldsV1")? {
        None => Ok(Value::Null),
        Some(raw) => serde_json::from_slice(raw)
            .map_err(|e| format!("FieldsV1 does not hold valid JSON: {e}")),
    }
}

/// `runtime.RawExtension`: the bytes of an embedded object, JSON or (rarely) a nested
/// protobuf object. Absent is Go's nil `Raw`, which marshals as `null`.
pub(super) fn raw_extension<'a>(
    bytes: &'a [u8],
    unknown: &mut Vec<u32>,
) -> Result<Raw<'a>, String> {
    match raw_bytes(bytes, unknown, "RawExtension")? {
        None => Ok(Raw::Json(Value::Null)),
        Some(raw) if raw.starts_with(MAGIC) => Ok(Raw::Protobuf(raw)),
        Some(raw) => serde_json::from_slice(raw)
            .map(Raw::Json)
            .map_err(|e| format!("RawExtension holds neither JSON nor a protobuf object: {e}")),
    }
}

/// Base64 as Go's `encoding/json` writes `[]byte`.
pub(super) fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ------------------------------------------------------------------ helpers

/// Runs `each` on every field; it returns `Ok(false)` for numbers it does not know,
/// which are skipped and recorded.
fn fields<'a>(
    bytes: &'a [u8],
    unknown: &mut Vec<u32>,
    mut each: impl FnMut(u32, WireType, &mut Reader<'a>) -> Result<bool, String>,
) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    while let Some((number, wire)) = r.key().map_err(|e| e.to_string())? {
        if !each(number, wire, &mut r)? {
            r.skip(number, wire).map_err(|e| e.to_string())?;
            unknown.push(number);
        }
    }
    Ok(())
}

fn expect_wire(
    number: u32,
    found: WireType,
    expected: WireType,
    message: &str,
) -> Result<(), String> {
    if found == expected {
        Ok(())
    } else {
        Err(format!(
            "field {number} of {message} has wire type {found}, expected {expected}"
        ))
    }
}

fn utf8(r: &mut Reader<'_>, number: u32, message: &str) -> Result<String, String> {
    let bytes = r.len_delimited().map_err(|e| e.to_string())?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| format!("field {number} of {message} is not valid UTF-8"))
}

/// The seconds and nanos fields shared by Time and MicroTime (and Timestamp).
fn seconds_nanos(bytes: &[u8], unknown: &mut Vec<u32>) -> Result<(i64, i32), String> {
    let (mut seconds, mut nanos) = (0i64, 0i32);
    fields(bytes, unknown, |number, wire, r| {
        match number {
            1 => {
                expect_wire(number, wire, WireType::Varint, "Time")?;
                seconds = r.varint().map_err(|e| e.to_string())? as i64;
            }
            2 => {
                expect_wire(number, wire, WireType::Varint, "Time")?;
                nanos = r.varint().map_err(|e| e.to_string())? as i32;
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((seconds, nanos))
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC, for the years Go can marshal.
fn civil(seconds: i64) -> Result<String, String> {
    if !(MIN_SECOND..END_SECOND).contains(&seconds) {
        return Err(format!(
            "time {seconds}s since 1970 is outside the years 0000-9999"
        ));
    }
    let ts = jiff::Timestamp::from_second(seconds).map_err(|e| e.to_string())?;
    Ok(ts.strftime("%Y-%m-%dT%H:%M:%S").to_string())
}

/// Field 1 (`raw`/`Raw`) of RawExtension and FieldsV1; `None` when absent.
fn raw_bytes<'a>(
    bytes: &'a [u8],
    unknown: &mut Vec<u32>,
    message: &str,
) -> Result<Option<&'a [u8]>, String> {
    let mut raw = None;
    fields(bytes, unknown, |number, wire, r| match number {
        1 => {
            expect_wire(number, wire, WireType::Len, message)?;
            raw = Some(r.len_delimited().map_err(|e| e.to_string())?);
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(raw)
}

/// Go's `time.Duration.String()`: `1h2m3.5s`, `1.5ms`, `0s`, `-1m0s`.
fn go_duration(nanos: i64) -> String {
    const SECOND: u64 = 1_000_000_000;
    if nanos == 0 {
        return "0s".to_owned();
    }
    let sign = if nanos < 0 { "-" } else { "" };
    let u = nanos.unsigned_abs();
    if u < SECOND {
        // Below a second: the largest unit under it, with a decimal fraction.
        let (unit, digits) = match u {
            0..1_000 => ("ns", 0),
            1_000..1_000_000 => ("µs", 3),
            _ => ("ms", 6),
        };
        return format!("{sign}{}{unit}", decimal(u, digits));
    }
    let seconds = decimal(u % (60 * SECOND), 9);
    let minutes = u / (60 * SECOND);
    match (minutes / 60, minutes % 60) {
        (0, 0) => format!("{sign}{seconds}s"),
        (0, m) => format!("{sign}{m}m{seconds}s"),
        (h, m) => format!("{sign}{h}h{m}m{seconds}s"),
    }
}

/// `value / 10^digits` with the fraction's trailing zeros (and a bare point) dropped.
fn decimal(value: u64, digits: u32) -> String {
    let scale = 10u64.pow(digits);
    let (whole, frac) = (value / scale, value % scale);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:0width$}", width = digits as usize);
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn seconds_nanos_msg(seconds: i64, nanos: i32) -> Vec<u8> {
        let mut m = vec![0x08];
        varint(seconds as u64, &mut m);
        m.push(0x10);
        varint(nanos as i64 as u64, &mut m);
        m
    }

    #[test]
    fn times() {
        let mut unknown = Vec::new();
        let t = seconds_nanos_msg(1_795_788_000, 999_999_999);
        assert_eq!(time(&t, &mut unknown).unwrap(), "2026-11-27T14:00:00Z");
        assert_eq!(
            micro_time(&t, &mut unknown).unwrap(),
            "2026-11-27T14:00:00.999999Z"
        );
        let t = seconds_nanos_msg(1_795_788_000, 1_000);
        assert_eq!(
            micro_time(&t, &mut unknown).unwrap(),
            "2026-11-27T14:00:00.000001Z"
        );
        assert_eq!(time(&[], &mut unknown).unwrap(), Value::Null);
        assert_eq!(micro_time(&[], &mut unknown).unwrap(), Value::Null);
        // Explicit zero fields are the Unix epoch, not Go's zero time.
        assert_eq!(
            time(&[0x08, 0x00], &mut unknown).unwrap(),
            "1970-01-01T00:00:00Z"
        );
        let early = seconds_nanos_msg(MIN_SECOND, 0);
        assert_eq!(time(&early, &mut unknown).unwrap(), "0000-01-01T00:00:00Z");
        let late = seconds_nanos_msg(END_SECOND, 0);
        assert!(
            time(&late, &mut unknown)
                .unwrap_err()
                .contains("outside the years")
        );
        let huge = seconds_nanos_msg(i64::MAX, i32::MAX);
        assert!(micro_time(&huge, &mut unknown).is_err());
        assert!(unknown.is_empty());
        // nanos must be a varint
        assert!(
            time(&[0x15, 0, 0, 0, 0], &mut unknown)
                .unwrap_err()
                .contains("wire type 5")
        );
    }

    #[test]
    fn durations() {
        for (nanos, text) in [
            (0, "0s"),
            (1, "1ns"),
            (1_500, "1.5µs"),
            (1_500_000, "1.5ms"),
            (999_999_999, "999.999999ms"),
            (1_000_000_000, "1s"),
            (90_000_000_000, "1m30s"),
            (3_600_000_000_000, "1h0m0s"),
            (3_723_500_000_000, "1h2m3.5s"),
            (-60_000_000_000, "-1m0s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
        ] {
            let mut m = vec![0x08];
            varint(nanos as u64, &mut m);
            assert_eq!(duration(&m, &mut Vec::new()).unwrap(), text, "{nanos}");
        }
    }

    #[test]
    fn int_or_strings() {
        let mut unknown = Vec::new();
        // type 0, intVal 8080
        assert_eq!(
            int_or_string(&[0x08, 0x00, 0x10, 0x90, 0x3f], &mut unknown).unwrap(),
            8080
        );
        // negative intVal as a 10-byte varint
        let mut m = vec![0x10];
        varint(-3i64 as u64, &mut m);
        assert_eq!(int_or_string(&m, &mut unknown).unwrap(), -3);
        // type 1, strVal "http", with intVal 0 present as Go writes it
        let m = [0x08, 0x01, 0x10, 0x00, 0x1a, 0x04, b'h', b't', b't', b'p'];
        assert_eq!(int_or_string(&m, &mut unknown).unwrap(), "http");
        assert_eq!(int_or_string(&[], &mut unknown).unwrap(), 0);
        assert!(int_or_string(&[0x08, 0x02], &mut unknown).is_err());
        assert!(unknown.is_empty());
    }

    #[test]
    fn quantities() {
        let mut unknown = Vec::new();
        let m = [0x0a, 0x04, b'5', b'0', b'0', b'm'];
        assert_eq!(quantity(&m, &mut unknown).unwrap(), "500m");
        assert_eq!(quantity(&[], &mut unknown).unwrap(), "0");
        // unknown field 2 is skipped and reported
        let m = [0x0a, 0x02, b'1', b'G', 0x10, 0x05];
        assert_eq!(quantity(&m, &mut unknown).unwrap(), "1G");
        assert_eq!(unknown, [2]);
        assert!(
            quantity(&[0x0a, 0x01, 0xff], &mut unknown)
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    #[test]
    fn raw_json() {
        let mut unknown = Vec::new();
        let json = br#"{"a":[1,2]}"#;
        let mut m = vec![0x0a, json.len() as u8];
        m.extend_from_slice(json);
        match raw_extension(&m, &mut unknown).unwrap() {
            Raw::Json(v) => assert_eq!(v, serde_json::json!({"a": [1, 2]})),
            Raw::Protobuf(_) => panic!("JSON expected"),
        }
        assert_eq!(
            fields_v1(&m, &mut unknown).unwrap(),
            serde_json::json!({"a": [1, 2]})
        );
        assert!(matches!(
            raw_extension(&[], &mut unknown).unwrap(),
            Raw::Json(Value::Null)
        ));
        assert_eq!(fields_v1(&[], &mut unknown).unwrap(), Value::Null);
        let m = [0x0a, 0x03, b'{', b'x', b'}'];
        assert!(raw_extension(&m, &mut unknown).is_err());
        assert!(fields_v1(&m, &mut unknown).is_err());
        let m = [0x0a, 0x05, b'k', b'8', b's', 0, 7];
        assert!(
            matches!(raw_extension(&m, &mut unknown).unwrap(), Raw::Protobuf(b) if b.len() == 5)
        );
    }
}
