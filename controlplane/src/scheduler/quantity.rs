//! Resource quantities (`100m`, `64Mi`, `1Gi`, `1e3`, `0.5`) as the
//! scheduler needs them: whole milli-units for cpu and whole units for
//! everything else, rounded up as upstream's `MilliValue()`/`Value()` do.
//! k8s-openapi keeps a `Quantity` as its string, so this parses it.
//!
//! Grammar (upstream's): an optional sign, digits with an optional decimal
//! point, then one suffix: a binary SI one (`Ki` `Mi` `Gi` `Ti` `Pi` `Ei`),
//! a decimal SI one (`n` `u` `m` `k` `M` `G` `T` `P` `E`) or a decimal
//! exponent (`e3`, `E-2`). `1E` is an exa; `1E3` is a thousand.

/// A parsed quantity: `mantissa * 2^binary * 10^decimal`, exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantity {
    negative: bool,
    mantissa: u128,
    binary: u32,
    decimal: i32,
}

/// More significant digits than this cannot change an `i64` result.
const MAX_DIGITS: usize = 36;

impl Quantity {
    /// Parses `text`; `None` when it is not a quantity.
    pub fn parse(text: &str) -> Option<Quantity> {
        let bytes = text.as_bytes();
        let mut i = 0;
        let mut negative = false;
        if let Some(&sign) = bytes.first()
            && (sign == b'+' || sign == b'-')
        {
            negative = sign == b'-';
            i = 1;
        }
        let mut mantissa: u128 = 0;
        let mut decimal: i32 = 0;
        let mut digits = 0usize;
        let mut seen_point = false;
        let mut any_digit = false;
        while let Some(&c) = bytes.get(i) {
            match c {
                b'0'..=b'9' => {
                    any_digit = true;
                    // Leading zeros carry no precision but hold a place.
                    let kept = if mantissa == 0 && c == b'0' {
                        true
                    } else if digits < MAX_DIGITS {
                        mantissa = mantissa * 10 + u128::from(c - b'0');
                        digits += 1;
                        true
                    } else {
                        false
                    };
                    match (seen_point, kept) {
                        (true, true) => decimal -= 1,
                        // A dropped integer digit still scales the value.
                        (false, false) => decimal += 1,
                        _ => {}
                    }
                }
                b'.' if !seen_point => seen_point = true,
                _ => break,
            }
            i += 1;
        }
        if !any_digit {
            return None;
        }
        let (binary, exponent) = suffix(&text[i..])?;
        Some(Quantity {
            negative: negative && mantissa != 0,
            mantissa,
            binary,
            decimal: decimal.checked_add(exponent)?,
        })
    }

    /// The value in whole units, rounded up (`Value()`), saturating.
    pub fn value(&self) -> i64 {
        self.scaled(0)
    }

    /// The value in thousandths, rounded up (`MilliValue()`), saturating.
    pub fn milli(&self) -> i64 {
        self.scaled(3)
    }

    /// `ceil(self * 10^extra)` as an `i64`, saturating at its bounds.
    fn scaled(&self, extra: i32) -> i64 {
        let magnitude = magnitude(self.mantissa, self.binary, self.decimal + extra);
        if self.negative {
            // Rounding up a negative value moves it toward zero.
            -(magnitude.floor.min(i64::MAX as u128) as i64)
        } else {
            magnitude.ceil.min(i64::MAX as u128) as i64
        }
    }
}

struct Magnitude {
    floor: u128,
    ceil: u128,
}

/// `mantissa * 2^binary * 10^decimal`, rounded both ways, saturating.
fn magnitude(mantissa: u128, binary: u32, decimal: i32) -> Magnitude {
    let saturated = Magnitude {
        floor: u128::MAX,
        ceil: u128::MAX,
    };
    if mantissa == 0 {
        return Magnitude { floor: 0, ceil: 0 };
    }
    let Some(mut value) = 1u128
        .checked_shl(binary)
        .filter(|_| binary < 127)
        .and_then(|factor| mantissa.checked_mul(factor))
    else {
        return saturated;
    };
    if decimal >= 0 {
        for _ in 0..decimal {
            match value.checked_mul(10) {
                Some(v) => value = v,
                None => return saturated,
            }
        }
        return Magnitude {
            floor: value,
            ceil: value,
        };
    }
    let mut inexact = false;
    for _ in 0..decimal.unsigned_abs() {
        if value == 0 {
            break;
        }
        inexact |= value % 10 != 0;
        value /= 10;
    }
    Magnitude {
        floor: value,
        ceil: value + u128::from(inexact),
    }
}

/// The suffix's binary and decimal exponents.
fn suffix(s: &str) -> Option<(u32, i32)> {
    Some(match s {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        _ => {
            let exponent = s.strip_prefix(['e', 'E'])?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (0, exponent.parse().ok()?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milli(s: &str) -> i64 {
        Quantity::parse(s).expect(s).milli()
    }

    fn value(s: &str) -> i64 {
        Quantity::parse(s).expect(s).value()
    }

    #[test]
    fn cpu_in_millis() {
        assert_eq!(milli("100m"), 100);
        assert_eq!(milli("1"), 1000);
        assert_eq!(milli("0.5"), 500);
        assert_eq!(milli(".5"), 500);
        assert_eq!(milli("2."), 2000);
        assert_eq!(milli("1.5"), 1500);
        assert_eq!(milli("250m"), 250);
        assert_eq!(milli("1k"), 1_000_000);
        assert_eq!(milli("+3"), 3000);
        assert_eq!(milli("0"), 0);
        assert_eq!(milli("0m"), 0);
        // Finer than a milli rounds up, as upstream does.
        assert_eq!(milli("100u"), 1);
        assert_eq!(milli("1n"), 1);
        assert_eq!(milli("0.0001"), 1);
        assert_eq!(milli("1e-3"), 1);
    }

    #[test]
    fn memory_in_bytes() {
        assert_eq!(value("64Mi"), 64 << 20);
        assert_eq!(value("1Gi"), 1 << 30);
        assert_eq!(value("1.5Gi"), 3 << 29);
        assert_eq!(value("128974848"), 128_974_848);
        assert_eq!(value("129e6"), 129_000_000);
        assert_eq!(value("129M"), 129_000_000);
        assert_eq!(value("123Mi"), 123 << 20);
        assert_eq!(value("1e3"), 1000);
        assert_eq!(value("1E3"), 1000);
        assert_eq!(value("1E"), 1_000_000_000_000_000_000);
        assert_eq!(value("1Ki"), 1024);
        assert_eq!(value("1k"), 1000);
        assert_eq!(value("500m"), 1);
        assert_eq!(value("110"), 110);
        assert_eq!(value("0.1Ki"), 103);
        assert_eq!(value("007"), 7);
    }

    #[test]
    fn negatives_and_saturation() {
        assert_eq!(value("-1"), -1);
        assert_eq!(milli("-100m"), -100);
        assert_eq!(value("-0.5"), 0);
        assert_eq!(value("100Ei"), i64::MAX);
        assert_eq!(value("1e400"), i64::MAX);
        assert_eq!(value("1e-400"), 1);
        assert_eq!(
            value("123456789012345678901234567890123456789012345"),
            i64::MAX
        );
        assert_eq!(milli("0.000000000000000000000000000000000000000000001"), 1);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "", "m", "1x", "1 m", "1.2.3", "1e", "1e+", "--1", "1mi", "Mi", "1KiB", "e3", "1.5.",
        ] {
            assert_eq!(Quantity::parse(bad), None, "{bad:?}");
        }
    }
}
