//! Shared by the golden command-stream tests.

/// Asserts that a transcript's lines are `expected`'s non-blank lines,
/// trimmed (so expectations can be indented in raw strings).
pub(crate) fn assert_transcript(lines: &[String], expected: &str) {
    let got = lines.join("\n");
    let expected = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(got, expected, "\n--- got:\n{got}\n");
}
