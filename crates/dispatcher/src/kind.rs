//! Action kinds, ids and specs.

use std::borrow::Cow;
use std::fmt;

/// What an action does: an open set of names, with the usual ones as
/// constants. Margins ([`crate::Dispatcher::set_margin`]) are per kind.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ActionKind(Cow<'static, str>);

impl ActionKind {
    /// Sending coins.
    pub const SEND: Self = Self::from_static("send");
    /// Consolidating the wallet's coins.
    pub const CONSOLIDATE: Self = Self::from_static("consolidate");
    /// Sweeping coins out of the wallet.
    pub const SWEEP: Self = Self::from_static("sweep");
    /// Importing keys or descriptors.
    pub const IMPORT: Self = Self::from_static("import");
    /// A liveness check.
    pub const HEARTBEAT: Self = Self::from_static("heartbeat");

    /// A kind named by a static string.
    pub const fn from_static(name: &'static str) -> Self {
        Self(Cow::Borrowed(name))
    }

    /// A kind named at run time.
    pub fn new(name: impl Into<String>) -> Self {
        Self(Cow::Owned(name.into()))
    }

    /// The kind's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One dispatch's id: a counter each dispatched action gets, unique
/// within its dispatcher and this process only (never persisted). It names
/// a run in a wallet's slot, not a durable action: those
/// (`lockstep-actions`) have their own caller-chosen string id that
/// survives restarts, and each drive of one is a dispatch with a fresh
/// `DispatchId`. Coin locks name either through [`crate::lock_holder`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct DispatchId(u64);

impl DispatchId {
    pub(crate) const fn new(id: u64) -> Self {
        Self(id)
    }

    /// The id as a number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for DispatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What is being dispatched: its kind, its deadline and whether it may give
/// up exclusivity early.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ActionSpec {
    /// The action's kind.
    pub kind: ActionKind,
    /// The height at which the action expires (stopped, outcome
    /// [`crate::Outcome::Expired`]); `None`: never.
    pub deadline_height: Option<u32>,
    /// Whether the action may call [`crate::ActionCtx::release_early`].
    pub early_release: bool,
}

impl ActionSpec {
    /// An exclusive action of `kind`, with no deadline.
    pub fn new(kind: ActionKind) -> Self {
        Self {
            kind,
            deadline_height: None,
            early_release: false,
        }
    }

    /// Expires at `height`.
    #[must_use]
    pub fn deadline(mut self, height: u32) -> Self {
        self.deadline_height = Some(height);
        self
    }

    /// May give up exclusivity early (e.g. once its coins are reserved).
    #[must_use]
    pub fn early_release(mut self, allowed: bool) -> Self {
        self.early_release = allowed;
        self
    }
}
