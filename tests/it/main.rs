//! lockstep's cross-crate tests: one binary, one module per area.

mod foundation;
mod manager;
