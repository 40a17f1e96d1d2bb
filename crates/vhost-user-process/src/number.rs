//! Numbers as operators and trace files write them: decimal, or
//! hexadecimal after `0x`/`0X`; `_` may group digits (`0xfee0_0000`), and
//! surrounding blanks are ignored. The one parser of the workspace's
//! options, settings files and traces.

/// Why a text is not the number asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    /// Not digits of either base, or beyond 64 bits.
    #[error("{0:?} is not a number (decimal, or hexadecimal with 0x)")]
    NotANumber(String),
    /// A number, but too large for the setting.
    #[error("{0:?} does not fit in {1} bits")]
    TooLarge(String, u32),
}

/// Parses `123`, `0x7b` or `0x7B`, with `_` between digits allowed.
pub fn parse_u64(text: &str) -> Result<u64, NumberError> {
    let digits = text.trim().replace('_', "");
    let parsed = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse(),
    };
    // from_str_radix and parse take a leading '+': a number has none here.
    match parsed {
        Ok(v) if !digits.contains('+') => Ok(v),
        _ => Err(NumberError::NotANumber(text.to_string())),
    }
}

/// [`parse_u64`], refusing values above `u32::MAX`.
pub fn parse_u32(text: &str) -> Result<u32, NumberError> {
    u32::try_from(parse_u64(text)?).map_err(|_| NumberError::TooLarge(text.to_string(), 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_hex_with_or_without_separators() {
        assert_eq!(parse_u64("123"), Ok(123));
        assert_eq!(parse_u64("0x7b"), Ok(123));
        assert_eq!(parse_u64("0X7B"), Ok(123));
        assert_eq!(parse_u64(" 0xfee0_0000 "), Ok(0xfee0_0000));
        assert_eq!(parse_u64("1_000"), Ok(1000));
        assert_eq!(parse_u64("0xffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(parse_u32("0xffffffff"), Ok(u32::MAX));
    }

    #[test]
    fn anything_else_is_refused_with_the_text() {
        for bad in [
            "",
            " ",
            "_",
            "0x",
            "x10",
            "0x-1",
            "-1",
            "+1",
            "0x+1",
            "1e3",
            "0b101",
            "12z",
            "0x1_0000_0000_0000_0000",
            "18446744073709551616",
        ] {
            assert_eq!(
                parse_u64(bad),
                Err(NumberError::NotANumber(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_u32("0x1_0000_0000"),
            Err(NumberError::TooLarge("0x1_0000_0000".into(), 32))
        );
        let e = parse_u64("zz").unwrap_err().to_string();
        assert!(e.contains("\"zz\"") && e.contains("0x"), "{e}");
    }
}
