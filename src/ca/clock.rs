//! Conversions between `SystemTime` and the whole-second times certificates
//! carry. Everything the CA records is truncated to seconds, so what it
//! reports equals what relying parties read from the certificate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::CaError;

pub(crate) fn to_unix(t: SystemTime) -> Result<i64, CaError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::TimeOutOfRange)?
        .as_secs();
    i64::try_from(secs).map_err(|_| CaError::TimeOutOfRange)
}

pub(crate) fn from_unix(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        // Certificates from before 1970 exist (SPIRE's fixtures use year 1);
        // clamping keeps comparisons meaningful without a panic.
        Err(_) => UNIX_EPOCH,
    }
}

pub(crate) fn to_offset(secs: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| CaError::TimeOutOfRange)
}

/// Human-readable UTC time for error messages.
pub(crate) fn display(t: SystemTime) -> String {
    to_unix(t)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| format!("{t:?}"))
}
