//! What a caller can do about a failed lockstep operation: the one
//! classification every error of every crate maps into ([`ErrorKind`]).
//!
//! Each operation has its own error enum, saying what went wrong; each of
//! them has a `kind()` giving one of these three answers, so a caller (the
//! chain loop's backoff, an action's retry, a service mapping errors to
//! status codes) decides the same way whatever crate the error came from.
//! It lives in a crate of its own, below every other, because the lowest
//! crates (the chain source and the store) both need it and neither may
//! depend on the other.

/// Whether a failed operation can succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Something was briefly unavailable (the database busy or locked, a
    /// chain source down, slow, or not yet holding what was asked for): the
    /// same call may succeed later. Nothing was written.
    Retryable,
    /// The input was wrong (a duplicate name, an unknown id, a source that
    /// sent data that cannot be right): retrying the same thing gives the
    /// same error. Nothing was written.
    Invalid,
    /// What the operation needs is unusable (a corrupt database or wallet,
    /// a full disk, a failing hook, a reorg deeper than the recorded
    /// hashes): stop cleanly; a restart resumes from the last commit once
    /// the cause is mended.
    Fatal,
}
