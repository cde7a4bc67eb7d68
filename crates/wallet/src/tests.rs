//! Wallet tests: published derivation vectors, descriptor errors, and the
//! persisted lookahead window.

use std::str::FromStr;

use bitcoin::base58;
use bitcoin::bip32::Xpriv;
use bitcoin::hex::FromHex;
use bitcoin::{Address, Network, NetworkKind, ScriptBuf};
use lockstep_store::{Store, StoreError, StoreOptions};
use miniscript::descriptor::{Descriptor, DescriptorPublicKey};

use crate::*;

/// The BIP84 vectors give the root as a `zprv`; miniscript reads `xprv`:
/// same key, other version bytes.
fn zprv_to_xprv(zprv: &str) -> String {
    let mut data = base58::decode_check(zprv).unwrap();
    data[..4].copy_from_slice(&[0x04, 0x88, 0xad, 0xe4]);
    base58::encode_check(&data)
}

fn address(script: &ScriptBuf, network: Network) -> String {
    Address::from_script(script, network).unwrap().to_string()
}

#[test]
fn bip84_vectors() {
    // BIP84 test vectors (bitcoin/bips, bip-0084.mediawiki), mnemonic
    // "abandon ... about".
    let root = zprv_to_xprv(
        "zprvAWgYBBk7JR8Gjrh4UJQ2uJdG1r3WNRRfURiABBE3RvMXYSrRJL62XuezvGdPvG6GFBZduosCc1YP5wixPox7zhZLfiUm8aunE96BBa4Kei5",
    );
    let d = WalletDescriptors::parse(
        &format!("wpkh({root}/84'/0'/0'/0/*)"),
        &format!("wpkh({root}/84'/0'/0'/1/*)"),
        Network::Bitcoin,
    )
    .unwrap();
    assert!(!d.is_watch_only());
    let at = |k, i| address(&d.script_at(k, i).unwrap(), Network::Bitcoin);
    assert_eq!(
        at(Keychain::External, 0),
        "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"
    );
    assert_eq!(
        at(Keychain::External, 1),
        "bc1qnjg0jd8228aq7egyzacy8cys3knf9xvrerkf9g"
    );
    assert_eq!(
        at(Keychain::Internal, 0),
        "bc1q8c6fshw2dlwun7ekn9qwf37cu2rn755upcp6el"
    );
    // The public descriptor derives the same scripts without the secret.
    let watch = WalletDescriptors::parse(
        &d.descriptor(Keychain::External).to_string(),
        &d.descriptor(Keychain::Internal).to_string(),
        Network::Bitcoin,
    )
    .unwrap();
    assert!(watch.is_watch_only());
    assert_eq!(
        watch.script_at(Keychain::External, 1).unwrap(),
        d.script_at(Keychain::External, 1).unwrap()
    );
}

#[test]
fn bip86_vectors() {
    // BIP86 test vectors (bitcoin/bips, bip-0086.mediawiki).
    let root = "xprv9s21ZrQH143K3GJpoapnV8SFfukcVBSfeCficPSGfubmSFDxo1kuHnLisriDvSnRRuL2Qrg5ggqHKNVpxR86QEC8w35uxmGoggxtQTPvfUu";
    let d = WalletDescriptors::parse(
        &format!("tr({root}/86'/0'/0'/0/*)"),
        &format!("tr({root}/86'/0'/0'/1/*)"),
        Network::Bitcoin,
    )
    .unwrap();
    let spk = |k, i| d.script_at(k, i).unwrap();
    assert_eq!(
        spk(Keychain::External, 0).to_hex_string(),
        "5120a60869f0dbcf1dc659c9cecbaf8050135ea9e8cdc487053f1dc6880949dc684c"
    );
    assert_eq!(
        address(&spk(Keychain::External, 0), Network::Bitcoin),
        "bc1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr"
    );
    assert_eq!(
        address(&spk(Keychain::External, 1), Network::Bitcoin),
        "bc1p4qhjn9zdvkux4e44uhx8tc55attvtyu358kutcqkudyccelu0was9fqzwh"
    );
    assert_eq!(
        address(&spk(Keychain::Internal, 0), Network::Bitcoin),
        "bc1p3qkhfews2uk44qtvauqyr2ttdsw7svhkl9nkm9s9c3x4ax5h60wqwruhk7"
    );
}

/// Turns a BIP341 vector's script tree into miniscript's `{A,B}` syntax, or
/// `None` when a leaf is not a plain `<key> OP_CHECKSIG` at version 0xc0.
fn tree_to_miniscript(tree: &serde_json::Value) -> Option<String> {
    if let Some(pair) = tree.as_array() {
        return Some(format!(
            "{{{},{}}}",
            tree_to_miniscript(&pair[0])?,
            tree_to_miniscript(&pair[1])?
        ));
    }
    let script = tree["script"].as_str()?;
    if tree["leafVersion"] != 192
        || script.len() != 68
        || !script.starts_with("20")
        || !script.ends_with("ac")
    {
        return None;
    }
    Some(format!("pk({})", &script[2..66]))
}

#[test]
fn bip341_vectors() {
    // BIP341 wallet test vectors (testdata/bip341): the scriptPubKey of an
    // internal key with an optional script tree, derived through the same
    // descriptor machinery the wallet uses.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/bip341/wallet-test-vectors.json"
    );
    let vectors: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for v in vectors["scriptPubKey"].as_array().unwrap() {
        let internal = v["given"]["internalPubkey"].as_str().unwrap();
        let tree = &v["given"]["scriptTree"];
        let text = if tree.is_null() {
            format!("tr({internal})")
        } else if let Some(tree) = tree_to_miniscript(tree) {
            format!("tr({internal},{tree})")
        } else {
            continue;
        };
        let descriptor = Descriptor::<DescriptorPublicKey>::from_str(&text).unwrap();
        let script = descriptor.at_derivation_index(0).unwrap().script_pubkey();
        assert_eq!(
            script.to_hex_string(),
            v["expected"]["scriptPubKey"].as_str().unwrap(),
            "{text}"
        );
        // And the check bites: another internal key gives another script.
        let mut other = Vec::<u8>::from_hex(internal).unwrap();
        other[31] ^= 1;
        if let Ok(wrong) = Descriptor::<DescriptorPublicKey>::from_str(&text.replace(
            internal,
            &bitcoin::hex::DisplayHex::to_lower_hex_string(&other),
        )) {
            assert_ne!(
                wrong.at_derivation_index(0).unwrap().script_pubkey(),
                script
            );
        }
        checked += 1;
    }
    assert!(checked >= 4, "{checked} vectors checked");
}

/// A regtest signing root for tests.
fn tprv(seed: u8) -> String {
    Xpriv::new_master(NetworkKind::Test, &[seed; 32])
        .unwrap()
        .to_string()
}

fn regtest_wpkh(seed: u8) -> WalletDescriptors {
    let root = tprv(seed);
    WalletDescriptors::parse(
        &format!("wpkh({root}/84'/1'/0'/0/*)"),
        &format!("wpkh({root}/84'/1'/0'/1/*)"),
        Network::Regtest,
    )
    .unwrap()
}

#[test]
fn descriptor_errors_are_typed() {
    let t = tprv(1);
    let xprv = Xpriv::new_master(NetworkKind::Main, &[1; 32])
        .unwrap()
        .to_string();
    let tpub_single = "02c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5";
    type Expect = fn(&DescriptorError) -> bool;
    let cases: Vec<(&str, String, String, Network, Expect)> = vec![
        (
            "mainnet key on regtest",
            format!("wpkh({xprv}/0/*)"),
            format!("wpkh({xprv}/1/*)"),
            Network::Regtest,
            |e| {
                matches!(
                    e,
                    DescriptorError::WrongNetwork {
                        keychain: Keychain::External,
                        found: NetworkKind::Main,
                        ..
                    }
                )
            },
        ),
        (
            "test key on mainnet",
            format!("wpkh({t}/0/*)"),
            format!("wpkh({t}/1/*)"),
            Network::Bitcoin,
            |e| {
                matches!(
                    e,
                    DescriptorError::WrongNetwork {
                        found: NetworkKind::Test,
                        ..
                    }
                )
            },
        ),
        (
            "malformed",
            "wpkh(notakey/0/*)".into(),
            format!("wpkh({t}/1/*)"),
            Network::Regtest,
            |e| {
                matches!(
                    e,
                    DescriptorError::Malformed {
                        keychain: Keychain::External,
                        ..
                    }
                )
            },
        ),
        (
            "bad checksum",
            format!("wpkh({t}/0/*)#aaaaaaaa"),
            format!("wpkh({t}/1/*)"),
            Network::Regtest,
            |e| matches!(e, DescriptorError::Malformed { .. }),
        ),
        (
            "not ranged",
            format!("wpkh({t}/0/*)"),
            format!("wpkh({t}/1/5)"),
            Network::Regtest,
            |e| {
                matches!(
                    e,
                    DescriptorError::NotRanged {
                        keychain: Keychain::Internal
                    }
                )
            },
        ),
        (
            "single key",
            format!("wpkh({t}/0/*)"),
            format!("wpkh({tpub_single})"),
            Network::Regtest,
            |e| {
                matches!(
                    e,
                    DescriptorError::NotRanged { .. } | DescriptorError::MixedSecrets
                )
            },
        ),
        (
            "same descriptor",
            format!("tr({t}/0/*)"),
            format!("tr({t}/0/*)"),
            Network::Regtest,
            |e| matches!(e, DescriptorError::SameDescriptor),
        ),
        (
            "bare",
            format!("pk({t}/0/*)"),
            format!("pk({t}/1/*)"),
            Network::Regtest,
            |e| matches!(e, DescriptorError::Unsupported { .. }),
        ),
        (
            "multipath",
            format!("wpkh({t}/<0;1>/*)"),
            format!("wpkh({t}/2/*)"),
            Network::Regtest,
            |e| matches!(e, DescriptorError::NotDerivable { .. }),
        ),
    ];
    for (name, ext, int, network, expected) in cases {
        match WalletDescriptors::parse(&ext, &int, network) {
            Err(e) => assert!(expected(&e), "{name}: got {e:?}"),
            Ok(_) => panic!("{name}: accepted"),
        }
    }
    // A hardened wildcard cannot be derived from the public key alone.
    let xpub = bitcoin::bip32::Xpub::from_priv(
        &bitcoin::secp256k1::Secp256k1::new(),
        &Xpriv::from_str(&t).unwrap(),
    );
    let hardened = WalletDescriptors::parse(
        &format!("wpkh({xpub}/0/*')"),
        &format!("wpkh({xpub}/1/*')"),
        Network::Regtest,
    );
    assert!(
        matches!(hardened, Err(DescriptorError::NotDerivable { .. })),
        "{hardened:?}"
    );
    // Watch-only xpub and signing xprv mixed across keychains is refused.
    let mixed = WalletDescriptors::parse(
        &format!("wpkh({t}/0/*)"),
        &format!("wpkh({xpub}/1/*)"),
        Network::Regtest,
    );
    assert!(matches!(mixed, Err(DescriptorError::MixedSecrets)));
}

#[test]
fn every_supported_kind_derives() {
    let (a, b, c) = (tprv(1), tprv(2), tprv(3));
    let kinds = [
        (format!("wpkh({a}/0/*)"), format!("wpkh({a}/1/*)")),
        (format!("tr({a}/0/*)"), format!("tr({a}/1/*)")),
        (
            format!("wsh(sortedmulti(2,{a}/0/*,{b}/0/*,{c}/0/*))"),
            format!("wsh(sortedmulti(2,{a}/1/*,{b}/1/*,{c}/1/*))"),
        ),
        (
            format!("wsh(multi(2,{a}/0/*,{b}/0/*))"),
            format!("wsh(multi(2,{a}/1/*,{b}/1/*))"),
        ),
    ];
    for (ext, int) in kinds {
        let d = WalletDescriptors::parse(&ext, &int, Network::Regtest).unwrap();
        let s0 = d.script_at(Keychain::External, 0).unwrap();
        assert_ne!(s0, d.script_at(Keychain::External, 1).unwrap());
        assert_ne!(s0, d.script_at(Keychain::Internal, 0).unwrap());
        assert!(s0.is_p2wpkh() || s0.is_p2tr() || s0.is_p2wsh(), "{ext}");
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("w.db"), StoreOptions::default()).unwrap();
    (dir, store)
}

#[test]
fn a_wallet_persists_and_reloads_without_deriving() {
    let (_dir, store) = open();
    let params = WalletParams {
        name: "alice",
        birth_height: 120,
        lookahead: 10,
        passphrase: Some("test passphrase"),
    };
    let created = store
        .write_blocking(move |tx| Wallet::create(tx, &params, regtest_wpkh(7)))
        .unwrap();
    assert_eq!(created.watch_scripts().count(), 20);
    let id = created.id();
    let loaded = store.read_blocking(move |tx| Wallet::load(tx, id)).unwrap();
    assert_eq!(loaded.name(), "alice");
    assert_eq!(loaded.birth_height(), 120);
    assert_eq!(loaded.network(), Network::Regtest);
    let scripts = |w: &Wallet| {
        w.watch_scripts()
            .map(|(k, i, s)| (k, i, s.to_owned()))
            .collect::<Vec<_>>()
    };
    assert_eq!(scripts(&loaded), scripts(&created));
    let (k, i, s) = scripts(&loaded)[13].clone();
    assert_eq!(loaded.script_index(&s), Some((k, i)));

    // A duplicate name is the caller's error.
    let params = WalletParams {
        name: "alice",
        birth_height: 0,
        lookahead: 10,
        passphrase: Some("test passphrase"),
    };
    let dup = store.write_blocking(move |tx| Wallet::create(tx, &params, regtest_wpkh(8)));
    assert!(matches!(
        dup,
        Err(WalletError::Store(StoreError::DuplicateWalletName { .. }))
    ));
    assert_eq!(dup.unwrap_err().kind(), lockstep_store::ErrorKind::Invalid);
}

#[test]
fn no_secret_reaches_the_database_file() {
    let (dir, store) = open();
    let descriptors = regtest_wpkh(9);
    let secret = descriptors.secret_descriptor(Keychain::External).unwrap();
    let root = tprv(9);
    assert!(secret.contains("tprv"));
    let params = WalletParams {
        name: "signer",
        birth_height: 0,
        lookahead: 5,
        passphrase: Some("test passphrase"),
    };
    store
        .write_blocking(move |tx| Wallet::create(tx, &params, descriptors))
        .unwrap();
    drop(store); // checkpoints the WAL into the main file
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(&root) && !text.contains("tprv"),
            "a private key is in the database in clear"
        );
    }
}

#[test]
fn the_lookahead_window_moves_at_once_and_persists() {
    let (_dir, store) = open();
    let params = WalletParams {
        name: "bob",
        birth_height: 0,
        lookahead: 25,
        passphrase: Some("test passphrase"),
    };
    let wallet = store
        .write_blocking(move |tx| Wallet::create(tx, &params, regtest_wpkh(3)))
        .unwrap();
    let id = wallet.id();
    // A chain of payments to scripts 0, 24, 49, 74 (three windows deep), as
    // one block could carry: each use derives the next window at once, so
    // every next script is known before the next transaction is looked at.
    let (wallet, derived) = store
        .write_blocking(move |tx| {
            let mut wallet = wallet;
            let mut derived = Vec::new();
            for index in [0u32, 24, 49, 74] {
                let script = wallet.descriptors().script_at(Keychain::External, index)?;
                assert_eq!(
                    wallet.script_index(&script),
                    Some((Keychain::External, index)),
                    "index {index} not watched"
                );
                derived.push(wallet.mark_used(tx, Keychain::External, index)?.0.len());
            }
            Ok::<_, WalletError>((wallet, derived))
        })
        .unwrap();
    assert_eq!(derived, vec![1, 24, 25, 25]);
    assert_eq!(wallet.last_used(Keychain::External), Some(74));
    assert_eq!(wallet.next_index(Keychain::External), 75);
    assert_eq!(
        wallet
            .watch_scripts()
            .filter(|(k, ..)| *k == Keychain::External)
            .count(),
        100
    );
    // Using an old index again derives nothing.
    let wallet = store
        .write_blocking(move |tx| {
            let mut wallet = wallet;
            assert!(wallet.mark_used(tx, Keychain::External, 3)?.0.is_empty());
            let (index, _, new) = wallet.reveal_next(tx, Keychain::Internal)?;
            assert_eq!((index, new.0.len()), (0, 1));
            Ok::<_, WalletError>(wallet)
        })
        .unwrap();
    let loaded = store.read_blocking(move |tx| Wallet::load(tx, id)).unwrap();
    assert_eq!(loaded.last_used(Keychain::External), Some(74));
    assert_eq!(loaded.next_index(Keychain::Internal), 1);
    assert_eq!(
        loaded.watch_scripts().count(),
        wallet.watch_scripts().count()
    );
}

#[test]
fn a_rolled_back_change_leaves_the_database_as_it_was() {
    let (_dir, store) = open();
    let params = WalletParams {
        name: "carol",
        birth_height: 0,
        lookahead: 5,
        passphrase: Some("test passphrase"),
    };
    let wallet = store
        .write_blocking(move |tx| Wallet::create(tx, &params, regtest_wpkh(4)))
        .unwrap();
    let id = wallet.id();
    let failed: Result<(), WalletError> = store.write_blocking(move |tx| {
        let mut wallet = wallet;
        wallet.mark_used(tx, Keychain::External, 4)?;
        Err(WalletError::NotFound(id)) // the block's transaction fails later
    });
    assert!(failed.is_err());
    let loaded = store.read_blocking(move |tx| Wallet::load(tx, id)).unwrap();
    assert_eq!(loaded.last_used(Keychain::External), None);
    assert_eq!(loaded.watch_scripts().count(), 10);
}

#[test]
fn signing_keys_are_encrypted_and_a_loaded_wallet_is_locked() {
    let (dir, store) = open();
    // A signing wallet needs a passphrase.
    let params = WalletParams {
        name: "nopass",
        birth_height: 0,
        lookahead: 3,
        passphrase: None,
    };
    let refused = store.write_blocking(move |tx| Wallet::create(tx, &params, regtest_wpkh(5)));
    assert!(matches!(refused, Err(WalletError::PassphraseRequired)));

    let params = WalletParams {
        name: "signer",
        birth_height: 0,
        lookahead: 3,
        passphrase: Some("hunter2"),
    };
    let created = store
        .write_blocking(move |tx| Wallet::create(tx, &params, regtest_wpkh(5)))
        .unwrap();
    assert!(created.is_signing() && !created.is_locked());
    let id = created.id();

    let mut wallet = store.read_blocking(move |tx| Wallet::load(tx, id)).unwrap();
    assert!(wallet.is_signing() && wallet.is_locked());
    assert!(
        wallet
            .descriptors()
            .secret_descriptor(Keychain::External)
            .is_none()
    );
    let wrong = wallet.clone();
    let err = store
        .read_blocking(move |tx| {
            let mut w = wrong;
            w.unlock(tx, "hunter3")
        })
        .unwrap_err();
    assert!(matches!(err, WalletError::WrongPassphrase), "{err:?}");
    wallet = store
        .read_blocking(move |tx| {
            let mut w = wallet;
            w.unlock(tx, "hunter2")?;
            Ok::<_, WalletError>(w)
        })
        .unwrap();
    assert!(!wallet.is_locked());
    assert_eq!(
        wallet.descriptors().secret_descriptor(Keychain::External),
        created.descriptors().secret_descriptor(Keychain::External)
    );
    wallet.lock();
    assert!(wallet.is_locked());

    // A watch-only wallet has nothing to unlock.
    let public = regtest_wpkh(6);
    let watch = WalletDescriptors::parse(
        &public.descriptor(Keychain::External).to_string(),
        &public.descriptor(Keychain::Internal).to_string(),
        Network::Regtest,
    )
    .unwrap();
    let params = WalletParams {
        name: "watch",
        birth_height: 0,
        lookahead: 3,
        passphrase: None,
    };
    let watch = store
        .write_blocking(move |tx| Wallet::create(tx, &params, watch))
        .unwrap();
    assert!(!watch.is_signing() && !watch.is_locked());
    let err = store
        .read_blocking(move |tx| {
            let mut w = watch;
            w.unlock(tx, "x")
        })
        .unwrap_err();
    assert!(matches!(err, WalletError::WatchOnly(_)));

    // Nothing secret in clear in any of the database's files.
    let root = Xpriv::from_str(&tprv(5)).unwrap();
    let secret_bytes = root.private_key.secret_bytes();
    drop(store);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("tprv"));
        assert!(!bytes.windows(32).any(|w| w == secret_bytes));
    }
}
