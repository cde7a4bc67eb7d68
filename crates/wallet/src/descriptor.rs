//! A wallet's two output descriptors, checked once when the wallet is made.

use bitcoin::bip32::{self, DerivationPath};
use bitcoin::secp256k1::{Secp256k1, VerifyOnly};
use bitcoin::{Network, NetworkKind, ScriptBuf};
use miniscript::ForEachKey;
use miniscript::descriptor::{
    Descriptor, DescriptorPublicKey, DescriptorSecretKey, DescriptorXKey, KeyMap,
};
use miniscript::{Translator, translate_hash_clone};

/// A wallet's two chains of scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Keychain {
    /// Receiving addresses handed out to payers.
    External,
    /// Change, paid by the wallet to itself.
    Internal,
}

impl Keychain {
    /// Both keychains, external first.
    pub const ALL: [Keychain; 2] = [Keychain::External, Keychain::Internal];

    /// The number the store keeps (0 external, 1 internal).
    pub fn as_u8(self) -> u8 {
        match self {
            Keychain::External => 0,
            Keychain::Internal => 1,
        }
    }

    /// The keychain of a stored number.
    pub fn from_u8(n: u8) -> Option<Keychain> {
        match n {
            0 => Some(Keychain::External),
            1 => Some(Keychain::Internal),
            _ => None,
        }
    }
}

impl std::fmt::Display for Keychain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Keychain::External => "external",
            Keychain::Internal => "internal",
        })
    }
}

/// Why a descriptor cannot make a wallet. All are the caller's input:
/// retrying the same descriptor gives the same error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DescriptorError {
    /// It does not parse (syntax, checksum, key encoding, miniscript rules).
    #[error("{keychain} descriptor is malformed: {reason}")]
    Malformed {
        /// Which descriptor.
        keychain: Keychain,
        /// miniscript's reason.
        reason: String,
    },
    /// A key is for another network (e.g. an `xpub` on regtest).
    #[error("{keychain} descriptor has a key for {found:?}, the wallet is on {expected}")]
    WrongNetwork {
        /// Which descriptor.
        keychain: Keychain,
        /// The wallet's network.
        expected: Network,
        /// The key's network kind.
        found: NetworkKind,
    },
    /// It has no wildcard (`/*`), so it describes one script, not a chain.
    #[error("{keychain} descriptor is not ranged (it needs a /* wildcard)")]
    NotRanged {
        /// Which descriptor.
        keychain: Keychain,
    },
    /// Its scripts cannot be derived from public keys alone (a hardened
    /// wildcard, or a multipath key).
    #[error("{keychain} descriptor cannot be derived: {reason}")]
    NotDerivable {
        /// Which descriptor.
        keychain: Keychain,
        /// Why.
        reason: String,
    },
    /// A kind of descriptor lockstep does not keep (bare scripts).
    #[error("{keychain} descriptor kind is not supported: {kind}")]
    Unsupported {
        /// Which descriptor.
        keychain: Keychain,
        /// The kind.
        kind: String,
    },
    /// External and internal are the same descriptor.
    #[error("the external and internal descriptors are the same")]
    SameDescriptor,
    /// One descriptor carries private keys and the other does not.
    #[error("only one of the two descriptors has private keys")]
    MixedSecrets,
}

/// A wallet's external and internal descriptors, public parts, with the
/// private keys of a signing wallet kept apart (never stored in clear).
#[derive(Debug, Clone)]
pub struct WalletDescriptors {
    network: Network,
    external: Descriptor<DescriptorPublicKey>,
    internal: Descriptor<DescriptorPublicKey>,
    secrets: Option<(KeyMap, KeyMap)>,
    /// The two descriptors with each extended key's fixed path (`/0` in
    /// `xpub/0/*`) derived once, so that a script costs one BIP32 step per
    /// key instead of one per path element. Only for scripts: their key
    /// origins no longer say where the keys come from.
    derivable: [Descriptor<DescriptorPublicKey>; 2],
}

/// One verification context for every derivation (miniscript's
/// `script_pubkey` would create one per key).
static SECP: std::sync::LazyLock<Secp256k1<VerifyOnly>> =
    std::sync::LazyLock::new(Secp256k1::verification_only);

/// Derives every extended key's fixed derivation path once.
struct PreDerive;

impl Translator<DescriptorPublicKey> for PreDerive {
    type TargetPk = DescriptorPublicKey;
    type Error = bip32::Error;

    fn pk(&mut self, pk: &DescriptorPublicKey) -> Result<DescriptorPublicKey, bip32::Error> {
        match pk {
            DescriptorPublicKey::XPub(x) if !x.derivation_path.is_empty() => {
                Ok(DescriptorPublicKey::XPub(DescriptorXKey {
                    origin: x.origin.clone(),
                    xkey: x.xkey.derive_pub(&*SECP, &x.derivation_path)?,
                    derivation_path: DerivationPath::master(),
                    wildcard: x.wildcard,
                }))
            }
            other => Ok(other.clone()),
        }
    }

    translate_hash_clone!(DescriptorPublicKey);
}

/// `descriptor` with its fixed paths derived, or as it is if that fails
/// (a hardened step: the descriptor is refused elsewhere).
fn pre_derive(descriptor: &Descriptor<DescriptorPublicKey>) -> Descriptor<DescriptorPublicKey> {
    descriptor
        .translate_pk(&mut PreDerive)
        .unwrap_or_else(|_| descriptor.clone())
}

impl WalletDescriptors {
    /// Parses and checks two ranged descriptors (with xpubs for a
    /// watch-only wallet, xprvs for a signing one) for `network`.
    pub fn parse(
        external: &str,
        internal: &str,
        network: Network,
    ) -> Result<WalletDescriptors, DescriptorError> {
        let secp = Secp256k1::new();
        let (ext, ext_keys) = parse_one(&secp, external, Keychain::External, network)?;
        let (int, int_keys) = parse_one(&secp, internal, Keychain::Internal, network)?;
        if ext == int {
            return Err(DescriptorError::SameDescriptor);
        }
        let secrets = match (ext_keys.is_empty(), int_keys.is_empty()) {
            (true, true) => None,
            (false, false) => Some((ext_keys, int_keys)),
            _ => return Err(DescriptorError::MixedSecrets),
        };
        let derivable = [pre_derive(&ext), pre_derive(&int)];
        Ok(WalletDescriptors {
            network,
            external: ext,
            internal: int,
            secrets,
            derivable,
        })
    }

    /// The wallet's network.
    pub fn network(&self) -> Network {
        self.network
    }

    /// The public descriptor of a keychain.
    pub fn descriptor(&self, keychain: Keychain) -> &Descriptor<DescriptorPublicKey> {
        match keychain {
            Keychain::External => &self.external,
            Keychain::Internal => &self.internal,
        }
    }

    /// Whether the wallet can only watch (no private keys were given).
    pub fn is_watch_only(&self) -> bool {
        self.secrets.is_none()
    }

    /// The private descriptor of a keychain (for encryption at rest), or
    /// `None` for a watch-only wallet.
    pub fn secret_descriptor(&self, keychain: Keychain) -> Option<String> {
        let (ext, int) = self.secrets.as_ref()?;
        Some(match keychain {
            Keychain::External => self.external.to_string_with_secret(ext),
            Keychain::Internal => self.internal.to_string_with_secret(int),
        })
    }

    /// The same descriptors with the private keys dropped (a locked wallet).
    pub(crate) fn without_secrets(&self) -> WalletDescriptors {
        WalletDescriptors {
            secrets: None,
            ..self.clone()
        }
    }

    /// The private keys of both keychains in one map (for signing), or
    /// `None` when locked or watch-only.
    pub(crate) fn signing_keys(&self) -> Option<KeyMap> {
        let (ext, int) = self.secrets.as_ref()?;
        let secp = Secp256k1::new();
        let mut all = ext.clone();
        for (_, secret) in int.clone() {
            // A key both keychains share is already in the map.
            let _ = all.insert(&secp, secret);
        }
        Some(all)
    }

    /// The script at `index` of a keychain.
    pub fn script_at(&self, keychain: Keychain, index: u32) -> Result<ScriptBuf, DescriptorError> {
        derive(
            &self.derivable[usize::from(keychain.as_u8())],
            keychain,
            index,
        )
    }
}

fn derive(
    descriptor: &Descriptor<DescriptorPublicKey>,
    keychain: Keychain,
    index: u32,
) -> Result<ScriptBuf, DescriptorError> {
    descriptor
        .derived_descriptor(&*SECP, index)
        .map(|d| d.script_pubkey())
        .map_err(|e| DescriptorError::NotDerivable {
            keychain,
            reason: e.to_string(),
        })
}

fn parse_one(
    secp: &Secp256k1<bitcoin::secp256k1::All>,
    text: &str,
    keychain: Keychain,
    network: Network,
) -> Result<(Descriptor<DescriptorPublicKey>, KeyMap), DescriptorError> {
    let (descriptor, keys) = Descriptor::parse_descriptor(secp, text.trim()).map_err(|e| {
        DescriptorError::Malformed {
            keychain,
            reason: e.to_string(),
        }
    })?;
    if let Descriptor::Bare(_) = descriptor {
        return Err(DescriptorError::Unsupported {
            keychain,
            kind: "bare script".into(),
        });
    }
    let expected = NetworkKind::from(network);
    let mut found = None;
    descriptor.for_each_key(|key| {
        let kind = match key {
            DescriptorPublicKey::Single(_) => None,
            DescriptorPublicKey::XPub(x) => Some(x.xkey.network),
            DescriptorPublicKey::MultiXPub(x) => Some(x.xkey.network),
        };
        if let Some(kind) = kind.filter(|k| *k != expected) {
            found = Some(kind);
        }
        true
    });
    for (_, secret) in keys.clone() {
        let kind = match secret {
            DescriptorSecretKey::Single(s) => s.key.network,
            DescriptorSecretKey::XPrv(x) => x.xkey.network,
            DescriptorSecretKey::MultiXPrv(x) => x.xkey.network,
        };
        if kind != expected {
            found = Some(kind);
        }
    }
    if let Some(found) = found {
        return Err(DescriptorError::WrongNetwork {
            keychain,
            expected: network,
            found,
        });
    }
    if descriptor.is_multipath() {
        return Err(DescriptorError::NotDerivable {
            keychain,
            reason: "multipath keys (<0;1>): give each keychain its own descriptor".into(),
        });
    }
    if !descriptor.has_wildcard() {
        return Err(DescriptorError::NotRanged { keychain });
    }
    derive(&descriptor, keychain, 0)?;
    Ok((descriptor, keys))
}
