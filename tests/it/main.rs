//! lockstep's cross-crate tests: one binary, one module per area.

mod crash;
mod foundation;
mod manager;
mod trust;
