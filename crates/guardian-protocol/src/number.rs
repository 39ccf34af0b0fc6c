//! Exact JSON numbers: what "the same number" means.
//!
//! This crate builds `serde_json` with `arbitrary_precision`, so a
//! [`serde_json::Number`] keeps the text it was parsed from: client and
//! server store and send a number exactly as the application wrote it
//! (`12345678901234567890123`, `-0`, `1.50`, `1e+400`), never through `f64`.
//! The one respelling is serde_json's: an exponent is written `e` with a
//! sign (`1E400` is kept as `1e+400`), which denotes the same value.
//!
//! Two numbers are the same when they denote the same decimal value, whatever
//! their spelling: `1`, `1.0`, `1e0` and `10E-1` are equal, and so are `0`
//! and `-0`. [`canonical_number`] names that value with one text; merges
//! ([`json_eq`]) and idempotency fingerprints compare through it.

use std::borrow::Cow;

use serde_json::{Number, Value};

/// Trailing zeros up to which an integer is written out in full (`1e+21`
/// is `1000000000000000000000`, `1e+22` keeps its exponent), so that
/// integers look as they usually do while `1e+400` stays short.
const MAX_PLAIN_INTEGER_ZEROS: i128 = 21;

/// Leading zeros after the decimal point up to which a fraction is written
/// out in full (`0.000001`); smaller values use an exponent (`1e-7`).
const MAX_PLAIN_FRACTION_ZEROS: i128 = 5;

/// The canonical text of the value `n` denotes.
///
/// The digits without leading or trailing zeros, without a sign for zero,
/// written as an integer (`100`, `12345678901234567890123`), a plain
/// decimal (`0.25`), or one digit, a fraction and an exponent (`1.5e+30`,
/// `5e-10`) when that would take many zeros. Two numbers are equal exactly when their canonical texts are. A
/// number already in this form is returned as it is, without allocating.
pub fn canonical_number(n: &Number) -> Cow<'_, str> {
    let text = n.as_str();
    match canonical_text(text) {
        Some(c) if c != text => Cow::Owned(c),
        // An exponent beyond i64 (which no parser turns into a value) is
        // compared by its text.
        _ => Cow::Borrowed(text),
    }
}

/// True when `a` and `b` are the same JSON value, numbers compared by the
/// value they denote ([`canonical_number`]) and objects regardless of key
/// order.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_str() == y.as_str() || canonical_number(x) == canonical_number(y)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, xv)| y.get(k).is_some_and(|yv| json_eq(xv, yv)))
        }
        _ => a == b,
    }
}

/// True when every number in `v` is already in canonical form, so that
/// `v` prints as its own canonical text.
pub fn numbers_are_canonical(v: &Value) -> bool {
    match v {
        Value::Number(n) => matches!(canonical_number(n), Cow::Borrowed(_)),
        Value::Array(items) => items.iter().all(numbers_are_canonical),
        Value::Object(map) => map.values().all(numbers_are_canonical),
        _ => true,
    }
}

/// The canonical form of a JSON number's text, `None` when the text is not a
/// JSON number or its exponent does not fit an `i64`.
fn canonical_text(text: &str) -> Option<String> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        || mantissa.ends_with('.')
    {
        return None;
    }
    // value = digits × 10^scale, digits without leading or trailing zeros.
    let all = format!("{int}{frac}");
    let digits = all.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    if trimmed.is_empty() {
        return Some("0".to_owned());
    }
    let len = i128::try_from(trimmed.len()).ok()?;
    let frac_len = i128::try_from(frac.len()).ok()?;
    let trailing = i128::try_from(digits.len() - trimmed.len()).ok()?;
    let scale = i128::from(exponent) - frac_len + trailing;
    // Digits before the decimal point.
    let point = len + scale;
    let mut out = String::with_capacity(trimmed.len() + 8);
    if negative {
        out.push('-');
    }
    if (0..=MAX_PLAIN_INTEGER_ZEROS).contains(&scale) {
        out.push_str(trimmed);
        out.extend(std::iter::repeat_n('0', usize::try_from(scale).ok()?));
    } else if scale < 0 && point > 0 {
        let at = usize::try_from(point).ok()?;
        out.push_str(&trimmed[..at]);
        out.push('.');
        out.push_str(&trimmed[at..]);
    } else if scale < 0 && point >= -MAX_PLAIN_FRACTION_ZEROS {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', usize::try_from(-point).ok()?));
        out.push_str(trimmed);
    } else {
        out.push_str(&trimmed[..1]);
        if trimmed.len() > 1 {
            out.push('.');
            out.push_str(&trimmed[1..]);
        }
        let e = point - 1;
        out.push('e');
        if e >= 0 {
            out.push('+');
        }
        out.push_str(&e.to_string());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(text: &str) -> Number {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn numbers_keep_their_text() {
        for text in [
            "12345678901234567890123",
            "-9223372036854775809",
            "3.141592653589793238462643383279",
            "1e+400",
            "-0",
            "1.50",
            "0.1",
        ] {
            let v: Value = serde_json::from_str(&format!("{{\"n\":{text}}}")).unwrap();
            assert_eq!(v.to_string(), format!("{{\"n\":{text}}}"));
        }
        // serde_json spells an exponent `e` with a sign; the digits stay.
        let v: Value = serde_json::from_str("[1E400,2.50e-3,3E+1]").unwrap();
        assert_eq!(v.to_string(), "[1e+400,2.50e-3,3e+1]");
    }

    #[test]
    fn canonical_forms() {
        for (text, canonical) in [
            ("0", "0"),
            ("-0", "0"),
            ("0.000", "0"),
            ("-0e-5", "0"),
            ("1", "1"),
            ("1.0", "1"),
            ("1e0", "1"),
            ("10E-1", "1"),
            ("1e2", "100"),
            ("100", "100"),
            ("-1.50", "-1.5"),
            ("0.25", "0.25"),
            ("25e-2", "0.25"),
            ("0.000001", "0.000001"),
            ("1e-7", "1e-7"),
            ("0.00000012", "1.2e-7"),
            ("123456789012345678901", "123456789012345678901"),
            ("1234567890123456789012", "1234567890123456789012"),
            ("1.2345678901234567890123e22", "12345678901234567890123"),
            ("1e21", "1000000000000000000000"),
            ("1e22", "1e+22"),
            ("15e21", "15000000000000000000000"),
            ("15e22", "1.5e+23"),
            ("-9223372036854775809", "-9223372036854775809"),
            ("18446744073709551616", "18446744073709551616"),
            ("1e400", "1e+400"),
            ("1.5E+400", "1.5e+400"),
            ("-2.5e-400", "-2.5e-400"),
            ("3.14159265358979323846", "3.14159265358979323846"),
        ] {
            assert_eq!(canonical_number(&num(text)), canonical, "{text}");
        }
    }

    #[test]
    fn canonical_text_borrows_when_already_canonical() {
        for text in ["0", "-12", "0.5", "1e+400", "18446744073709551616"] {
            assert!(
                matches!(canonical_number(&num(text)), Cow::Borrowed(_)),
                "{text}"
            );
        }
        assert!(matches!(canonical_number(&num("1.0")), Cow::Owned(_)));
    }

    #[test]
    fn huge_exponents_do_not_overflow() {
        let n = num("1e99999999999999999999999");
        assert_eq!(canonical_number(&n), "1e+99999999999999999999999");
        let max = format!("9e{}", i64::MAX);
        assert_eq!(canonical_number(&num(&max)), format!("9e+{}", i64::MAX));
        let min = format!("0.5e{}", i64::MIN);
        assert_eq!(
            canonical_number(&num(&min)),
            format!("5e{}", i128::from(i64::MIN) - 1)
        );
    }

    #[test]
    fn equality_is_by_value() {
        let a: Value = serde_json::from_str(r#"{"a":[1.0,-0,1e2],"b":{"c":0.50}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"c":0.5},"a":[1,0,100]}"#).unwrap();
        assert!(json_eq(&a, &b));
        assert_ne!(a, b, "serde_json's own equality stays textual");
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": 2})));
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": 1, "b": 1})));
        assert!(!json_eq(&json!([1]), &json!([1, 1])));
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": "1"})));
        let big = |t: &str| serde_json::from_str::<Value>(t).unwrap();
        assert!(!json_eq(
            &big("12345678901234567890123"),
            &big("12345678901234567890124")
        ));
        assert!(numbers_are_canonical(&b));
        assert!(!numbers_are_canonical(&a));
    }
}
