//! The proxy-wasm header-map wire format, read as bytes.
//!
//! The host hands a header map over as: the number of pairs (u32,
//! little-endian), then a (name length, value length) u32 pair for each,
//! then each name and value followed by a NUL. Header values may hold any
//! byte but NUL, CR and LF (HTTP's obs-text is legal), so they stay bytes
//! here: the SDK's `String` API panics on one that is not UTF-8, which aborts
//! the VM for every later request. Parsing never panics; a map that does not
//! add up ends the iteration, and a missing header fails closed further on.

/// The pairs of a serialised header map, in order.
pub fn iter(buf: &[u8]) -> Pairs<'_> {
    let count = read_u32(buf, 0).unwrap_or(0);
    Pairs {
        buf,
        index: 0,
        count,
        // Data starts after the count and the count's length pairs.
        data: (count as usize)
            .checked_mul(8)
            .and_then(|n| n.checked_add(4)),
    }
}

/// Iterator over `(name, value)` of a serialised header map.
pub struct Pairs<'a> {
    buf: &'a [u8],
    index: u32,
    count: u32,
    /// Offset of the next name; `None` once the map stopped adding up.
    data: Option<usize>,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.count {
            return None;
        }
        let sizes = (self.index as usize).checked_mul(8)?.checked_add(4)?;
        let name_len = read_u32(self.buf, sizes)? as usize;
        let value_len = read_u32(self.buf, sizes.checked_add(4)?)? as usize;
        let at = self.data?;
        let name_end = at.checked_add(name_len)?;
        let name = self.buf.get(at..name_end)?;
        let value_at = name_end.checked_add(1)?;
        let value_end = value_at.checked_add(value_len)?;
        let value = self.buf.get(value_at..value_end)?;
        self.data = value_end.checked_add(1);
        self.index += 1;
        Some((name, value))
    }
}

/// A header value as text: its bytes when they are UTF-8 (nearly always),
/// otherwise with U+FFFD for the bytes that are not, which then fail the
/// token and path checks. `String::from_utf8_lossy` alone walks every value
/// chunk by chunk, where `str::from_utf8` checks ASCII a word at a time:
/// reading a request's headers took 7,247 instructions with it, 2,944 with
/// this (callgrind, examples/hotpath `headers`; most of it is the token).
pub fn text(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(value).into_owned(),
    }
}

/// Serialises pairs in the same format, for the host to read (a local
/// answer's headers). A length over 4 GiB cannot occur (Envoy caps headers
/// far below); it would be written as `u32::MAX` and refused by the host.
pub fn encode<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let (count, data) = pairs.clone().fold((0usize, 0usize), |(c, d), (n, v)| {
        (c + 1, d + n.len() + v.len() + 2)
    });
    let mut out = Vec::with_capacity(4 + 8 * count + data);
    out.extend_from_slice(&len(count));
    for (name, value) in pairs.clone() {
        out.extend_from_slice(&len(name.len()));
        out.extend_from_slice(&len(value.len()));
    }
    for (name, value) in pairs {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(<[u8; 4]>::try_from(bytes).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_keeps_utf8_and_marks_the_rest() {
        assert_eq!(text(b"Bearer a.b.c"), "Bearer a.b.c");
        assert_eq!(text("\u{e9}".as_bytes()), "\u{e9}");
        assert_eq!(text(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(text(b""), "");
    }

    fn encode(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        super::encode(pairs.iter().copied())
    }

    /// The format byte by byte, as the proxy-wasm ABI spells it, so
    /// `encode` and `iter` cannot agree on a mistake.
    #[test]
    fn encode_writes_the_abi_format() {
        let got = encode(&[(b"ab", b"c"), (b"", b"")]);
        let want: Vec<u8> = [
            &2u32.to_le_bytes()[..],
            &2u32.to_le_bytes(),
            &1u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            b"ab\0c\0\0\0",
        ]
        .concat();
        assert_eq!(got, want);
    }

    #[test]
    fn round_trip_keeps_order_duplicates_and_any_bytes() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b":path", b"/fhir/Patient/1"),
            (b"x-note", b"caf\xe9"),
            (b"cookie", b"a=1"),
            (b"cookie", b""),
            (b"", b"empty name"),
        ];
        let buf = encode(&pairs);
        assert_eq!(iter(&buf).collect::<Vec<_>>(), pairs);
    }

    #[test]
    fn empty_and_truncated_maps_yield_what_adds_up() {
        assert_eq!(iter(&[]).count(), 0);
        assert_eq!(iter(&encode(&[])).count(), 0);
        let buf = encode(&[(b"a", b"1"), (b"bb", b"22")]);
        // Every truncation yields a prefix of the pairs and never panics
        // (the last NUL is not needed to read the last value).
        for cut in 0..buf.len() - 1 {
            let got: Vec<_> = iter(buf.get(..cut).unwrap_or_default()).collect();
            assert!(got.len() < 2, "cut at {cut}");
            if let Some(first) = got.first() {
                assert_eq!(*first, (&b"a"[..], &b"1"[..]));
            }
        }
    }

    #[test]
    fn lies_about_sizes_never_panic() {
        let mut buf = encode(&[(b"a", b"1")]);
        // Count far beyond the buffer, then lengths beyond it.
        buf.splice(0..4, u32::MAX.to_le_bytes());
        assert_eq!(iter(&buf).count(), 0);
        let mut buf = encode(&[(b"a", b"1")]);
        buf.splice(4..8, u32::MAX.to_le_bytes());
        assert_eq!(iter(&buf).count(), 0);
        for seed in 0u32..2000 {
            let junk: Vec<u8> = (0..(seed % 64))
                .map(|i| (seed.wrapping_mul(2_654_435_761).rotate_left(i) & 0xff) as u8)
                .collect();
            let _ = iter(&junk).count();
        }
    }
}
