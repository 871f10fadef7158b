//! Rewrites an HPACK header block (RFC 7541) so that every string literal
//! is carried raw instead of Huffman-coded. The rewritten block means
//! exactly what the original did, dynamic-table updates included, because
//! HPACK's table holds decoded strings. It exists for speed: loona-hpack
//! rebuilds its Huffman decoding table (a map of 257 codes) for every
//! literal it meets, and `h2` clients send `:path` as a Huffman literal on
//! every request. The table here is built once, at compile time.

/// Code length in bits of each symbol 0..=255 and of EOS (256), from
/// RFC 7541 Appendix B. The code is canonical: the codes of one length are
/// consecutive, in symbol order, and follow every shorter code. So the
/// lengths alone determine every code (the tests check a few against the
/// RFC's examples and every symbol against loona-hpack's own table).
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

const EOS: u16 = 256;
const MAX_CODE_LENGTH: usize = 30;

/// Canonical decoding tables: for each length, the first code of that
/// length, how many codes have it, and where its symbols start in
/// `symbols` (every symbol, sorted by length then value).
struct Canonical {
    first_code: [u32; MAX_CODE_LENGTH + 1],
    count: [u32; MAX_CODE_LENGTH + 1],
    offset: [u32; MAX_CODE_LENGTH + 1],
    symbols: [u16; 257],
}

const fn canonical() -> Canonical {
    let mut count = [0u32; MAX_CODE_LENGTH + 1];
    let mut i = 0;
    while i < 257 {
        count[CODE_LENGTHS[i] as usize] += 1;
        i += 1;
    }
    let mut first_code = [0u32; MAX_CODE_LENGTH + 1];
    let mut offset = [0u32; MAX_CODE_LENGTH + 1];
    let (mut code, mut placed) = (0u32, 0u32);
    let mut len = 1;
    while len <= MAX_CODE_LENGTH {
        code = (code + count[len - 1]) << 1;
        first_code[len] = code;
        offset[len] = placed;
        placed += count[len];
        len += 1;
    }
    let mut symbols = [0u16; 257];
    let mut next = offset;
    let mut symbol = 0;
    while symbol < 257 {
        let len = CODE_LENGTHS[symbol] as usize;
        symbols[next[len] as usize] = symbol as u16;
        next[len] += 1;
        symbol += 1;
    }
    Canonical {
        first_code,
        count,
        offset,
        symbols,
    }
}

static CANONICAL: Canonical = canonical();

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("HPACK block ends inside a field")]
    Truncated,
    #[error("HPACK integer too large")]
    IntegerTooLarge,
    #[error("Huffman string contains EOS")]
    EosInString,
    #[error("Huffman string padding longer than 7 bits")]
    PaddingTooLong,
    #[error("Huffman string padding is not a prefix of EOS")]
    PaddingNotEos,
}

/// Appends the Huffman-decoded `coded` to `out`.
pub fn huffman_decode(coded: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let table = &CANONICAL;
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in coded {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            // Every 30-bit string is some code (EOS is the last one), so a
            // symbol is always found by then.
            let index = code.wrapping_sub(table.first_code[len]);
            if index < table.count[len] {
                let symbol = table.symbols[(table.offset[len] + index) as usize];
                if symbol == EOS {
                    return Err(HpackError::EosInString);
                }
                out.push(symbol as u8);
                (code, len) = (0, 0);
            } else if len == MAX_CODE_LENGTH {
                return Err(HpackError::EosInString);
            }
        }
    }
    if len > 7 {
        return Err(HpackError::PaddingTooLong);
    }
    if code != (1u32 << len) - 1 {
        return Err(HpackError::PaddingNotEos);
    }
    Ok(())
}

/// Reads an HPACK integer with an `prefix_bits`-bit prefix at the start of
/// `block`: its value and how many bytes it took.
fn read_integer(block: &[u8], prefix_bits: u32) -> Result<(usize, usize), HpackError> {
    let first = *block.first().ok_or(HpackError::Truncated)?;
    let max_prefix = (1usize << prefix_bits) - 1;
    let mut value = usize::from(first) & max_prefix;
    if value < max_prefix {
        return Ok((value, 1));
    }
    let mut shift = 0u32;
    for (i, &byte) in block.iter().enumerate().skip(1) {
        // Four continuation bytes reach 2^28, far past any length or index
        // a header block of at most MAX_HEADER_BLOCK bytes can carry; a
        // fifth is refused.
        if shift > 21 {
            return Err(HpackError::IntegerTooLarge);
        }
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(HpackError::Truncated)
}

/// Copies the string literal at the start of `block` to `out`, raw, and
/// returns how many bytes of `block` it took.
fn copy_string(block: &[u8], out: &mut Vec<u8>) -> Result<usize, HpackError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let (length, header) = read_integer(block, 7)?;
    let end = header.checked_add(length).ok_or(HpackError::Truncated)?;
    let data = block.get(header..end).ok_or(HpackError::Truncated)?;
    if huffman {
        let mut decoded = Vec::with_capacity(data.len() * 8 / 5 + 1);
        huffman_decode(data, &mut decoded)?;
        // The length's 7-bit prefix with the Huffman flag clear.
        out.extend_from_slice(&loona_hpack::encoder::encode_integer(decoded.len(), 7));
        out.extend_from_slice(&decoded);
    } else {
        out.extend_from_slice(&block[..end]);
    }
    Ok(end)
}

/// Appends `block` to `out` with every Huffman-coded string literal
/// replaced by its raw form. Everything else is copied byte for byte.
pub fn unhuffman(mut block: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    while let Some(&first) = block.first() {
        // RFC 7541 §6: the high bits say which representation this is and
        // how wide the prefix of its integer is.
        let (prefix_bits, has_strings) = if first & 0x80 != 0 {
            (7, false) // indexed field
        } else if first & 0x40 != 0 {
            (6, true) // literal with incremental indexing
        } else if first & 0x20 != 0 {
            (5, false) // dynamic table size update
        } else {
            (4, true) // literal without indexing, or never indexed
        };
        let (index, used) = read_integer(block, prefix_bits)?;
        out.extend_from_slice(&block[..used]);
        block = &block[used..];
        if has_strings {
            if index == 0 {
                let used = copy_string(block, out)?;
                block = &block[used..];
            }
            let used = copy_string(block, out)?;
            block = &block[used..];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The canonical code of `symbol`, rebuilt here from the lengths by the
    /// usual rule, independently of the decoding tables.
    fn codes() -> Vec<(u32, u8)> {
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (CODE_LENGTHS[s], s));
        let mut out = vec![(0u32, 0u8); 257];
        let (mut code, mut previous) = (0u32, CODE_LENGTHS[order[0]]);
        for (i, &symbol) in order.iter().enumerate() {
            let len = CODE_LENGTHS[symbol];
            if i > 0 {
                code = (code + 1) << (len - previous);
            }
            previous = len;
            out[symbol] = (code, len);
        }
        out
    }

    fn huffman_encode(text: &[u8]) -> Vec<u8> {
        let codes = codes();
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &b in text {
            let (code, len) = codes[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            let pad = 8 - bits;
            out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
        }
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_rfc_examples_decode() {
        // RFC 7541 C.4.1–C.4.3.
        for (coded, text) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
        ] {
            let mut out = Vec::new();
            huffman_decode(&hex(coded), &mut out).unwrap();
            assert_eq!(out, text.as_bytes());
            assert_eq!(huffman_encode(text.as_bytes()), hex(coded));
        }
    }

    /// Every symbol, checked against loona-hpack's own code table: our
    /// code for each byte must decode to that byte there too.
    #[test]
    fn every_symbol_agrees_with_loona_hpack() {
        for b in 0..=255u8 {
            let text = [b, b'a', b];
            let coded = huffman_encode(&text);
            let theirs = loona_hpack::huffman::HuffmanDecoder::new()
                .decode(&coded)
                .unwrap();
            assert_eq!(theirs, text, "symbol {b}");
            let mut ours = Vec::new();
            huffman_decode(&coded, &mut ours).unwrap();
            assert_eq!(ours, text, "symbol {b}");
        }
    }

    #[test]
    fn bad_huffman_strings_are_refused() {
        // A full byte of ones after "a" (00011): 11 bits of padding.
        let mut long_pad = huffman_encode(b"a");
        long_pad.push(0xff);
        assert_eq!(
            huffman_decode(&long_pad, &mut Vec::new()),
            Err(HpackError::PaddingTooLong)
        );
        // "a" then zeros: padding that is not EOS's prefix.
        assert_eq!(
            huffman_decode(&[0b0001_1000], &mut Vec::new()),
            Err(HpackError::PaddingNotEos)
        );
        // EOS itself: thirty ones.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xfc], &mut Vec::new()),
            Err(HpackError::EosInString)
        );
    }

    #[test]
    fn malformed_blocks_are_refused() {
        // A literal whose value claims 5 bytes but has 2.
        assert_eq!(
            unhuffman(&[0x04, 0x85, 0xaa, 0xbb], &mut Vec::new()),
            Err(HpackError::Truncated)
        );
        // An integer continued forever.
        assert_eq!(
            unhuffman(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], &mut Vec::new()),
            Err(HpackError::IntegerTooLarge)
        );
        assert_eq!(
            unhuffman(&[0xff], &mut Vec::new()),
            Err(HpackError::Truncated)
        );
    }

    fn write_integer(value: usize, prefix_bits: u8, flags: u8, out: &mut Vec<u8>) {
        loona_hpack::encoder::encode_integer_into(value, prefix_bits, flags, out).unwrap();
    }

    fn write_string(text: &[u8], huffman: bool, out: &mut Vec<u8>) {
        if huffman {
            let coded = huffman_encode(text);
            write_integer(coded.len(), 7, 0x80, out);
            out.extend_from_slice(&coded);
        } else {
            write_integer(text.len(), 7, 0, out);
            out.extend_from_slice(text);
        }
    }

    /// Random blocks of every representation, strings Huffman-coded or
    /// not: loona-hpack must read the rewritten block exactly as it reads
    /// the original, dynamic table included (the same decoder state is
    /// carried from block to block on both sides).
    #[test]
    fn rewritten_blocks_decode_exactly_as_the_originals() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7541);
        let mut original = loona_hpack::Decoder::new();
        let mut rewritten = loona_hpack::Decoder::new();
        let mut table_len = 0usize;
        for _ in 0..300 {
            let mut block = Vec::new();
            for _ in 0..rng.random_range(1..12) {
                let text = |rng: &mut rand::rngs::StdRng| -> Vec<u8> {
                    let n = rng.random_range(0..200);
                    (0..n).map(|_| rng.random()).collect()
                };
                match rng.random_range(0..5) {
                    0 => write_integer(rng.random_range(1..=61 + table_len), 7, 0x80, &mut block),
                    1 => write_integer(rng.random_range(0..=4096), 5, 0x20, &mut block),
                    kind => {
                        let (prefix, flags) = match kind {
                            2 => (6, 0x40),
                            3 => (4, 0x00),
                            _ => (4, 0x10),
                        };
                        let name_index = if rng.random_bool(0.5) {
                            rng.random_range(1..=61)
                        } else {
                            0
                        };
                        write_integer(name_index, prefix, flags, &mut block);
                        if name_index == 0 {
                            write_string(&text(&mut rng), rng.random(), &mut block);
                        }
                        write_string(&text(&mut rng), rng.random(), &mut block);
                        if kind == 2 {
                            table_len += 1;
                        }
                    }
                }
            }
            let mut raw = Vec::new();
            unhuffman(&block, &mut raw).unwrap();
            let expected = original.decode(&block);
            let got = rewritten.decode(&raw);
            assert_eq!(format!("{got:?}"), format!("{expected:?}"));
            if expected.is_err() {
                // An index past a table that has since evicted: both
                // decoders refuse it; start both over.
                original = loona_hpack::Decoder::new();
                rewritten = loona_hpack::Decoder::new();
                table_len = 0;
            } else {
                let mut again = Vec::new();
                unhuffman(&raw, &mut again).unwrap();
                assert_eq!(again, raw, "no Huffman string is left to rewrite");
            }
        }
    }
}
