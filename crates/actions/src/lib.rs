//! Durable multi-step actions (send, consolidate) that checkpoint every step,
//! hold their coins under their own id and resume after a crash.
//!
//! Filled in by a later issue.
