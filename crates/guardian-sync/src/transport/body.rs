//! Reading a response body without trusting its size.

/// Why a bounded body read stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The body (announced or received) is larger than the limit.
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    /// The connection failed or timed out mid-body.
    #[error(transparent)]
    Network(#[from] reqwest::Error),
}

/// Most bytes reserved for a body on its announced length, before any arrive.
const PREALLOCATED: usize = 64 << 10;

/// Reads `response`'s body, refusing it as soon as it would exceed `max`
/// bytes: by its `Content-Length` before reading, or chunk by chunk, so a
/// hostile server cannot make the client buffer more than `max`.
pub(crate) async fn read_bounded(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    let announced = response
        .content_length()
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if announced.is_some_and(|n| n > max) {
        return Err(BodyError::TooLarge(max));
    }
    // A small answer lands without regrowing; a lying length costs no more.
    let mut body = Vec::with_capacity(announced.unwrap_or(0).min(PREALLOCATED));
    while let Some(chunk) = response.chunk().await? {
        if body.len().saturating_add(chunk.len()) > max {
            return Err(BodyError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
