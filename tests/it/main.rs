//! lockstep's cross-crate tests: one binary, one module per area.

mod actions;
mod actions_crash;
mod bitcoind;
mod crash;
mod dispatch;
mod events;
mod foundation;
mod lifecycle;
mod live;
mod manager;
mod mempool;
mod parking;
mod regtest;
mod tidy;
mod trust;
