//! Writes the seed corpus, `fuzz/corpus/<target>/<name>`: valid inputs of each kind, so the
//! fuzzer starts from the formats' real shape, and the hostile ones the pipeline must refuse
//! (named after the attack), then runs every seed once through its target's checks.
//!
//! `cargo run --release --manifest-path fuzz/Cargo.toml --example make-corpus`.
//! Deterministic: running it again rewrites the same bytes.

use std::io::Write;
use std::path::Path;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use fleetcast_events::manifest::{FileEntry, TreeRoot};
use fleetcast_events::tree::{self, Built, ChunkList, NodeRef, TreeFile, Walk};
use fleetcast_events::v1::*;
use fleetcast_events::{Encoding, SecretKey, SignedManifest};
use fleetcast_fuzz::{now, signed_json};
use fleetcast_package::chunking;
use fleetcast_package::testing::{pseudo_random, replace_all};
use serde_json::{Value, json};
use time::Duration;
use zip::write::SimpleFileOptions;

/// A seed: its file name and bytes.
type Seed = (String, Vec<u8>);
/// A target's name, its seeds, and the checks it runs on one input.
type Target = (&'static str, Vec<Seed>, fn(&[u8]));

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [Target; 4] = [
        ("archive", archives(), fleetcast_fuzz::archive),
        ("manifest", manifests(), fleetcast_fuzz::manifest),
        ("event", events(), fleetcast_fuzz::event),
        ("tree", tree_nodes(), fleetcast_fuzz::tree),
    ];
    let mut total = 0;
    for (target, seeds, check) in targets {
        let dir = root.join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        for (name, bytes) in &seeds {
            check(bytes);
            std::fs::write(dir.join(name), bytes).expect("write seed");
            total += bytes.len();
        }
        println!("{target}: {} seeds", seeds.len());
    }
    println!("{total} bytes in all");
}

fn seed(name: &str, bytes: impl Into<Vec<u8>>) -> Seed {
    (name.to_string(), bytes.into())
}

enum Item<'a> {
    File(&'a str, &'a [u8], u32),
    Link(&'a str, &'a str),
    Dir(&'a str),
}

fn zip_of(items: &[Item]) -> Vec<u8> {
    zip_with(items, SimpleFileOptions::default())
}

fn zip_with(items: &[Item], base: SimpleFileOptions) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for item in items {
        match *item {
            Item::File(path, data, mode) => {
                w.start_file(path, base.unix_permissions(mode))
                    .expect("zip entry");
                w.write_all(data).expect("zip write");
            }
            Item::Link(path, target) => w.add_symlink(path, target, base).expect("zip link"),
            Item::Dir(path) => w.add_directory(path, base).expect("zip dir"),
        }
    }
    w.finish().expect("zip finish").into_inner()
}

fn find(bytes: &[u8], what: &[u8]) -> usize {
    bytes
        .windows(what.len())
        .rposition(|w| w == what)
        .expect("signature present")
}

/// Bytes written over an archive's own: at this offset, these.
type Overwrite<'a> = (usize, &'a [u8]);

const CENTRAL: &[u8] = b"PK\x01\x02";
const EOCD: &[u8] = b"PK\x05\x06";

fn archives() -> Vec<Seed> {
    use Item::*;
    let config = b"command = [\"bin/collector\", \"--fast\"]\n[env]\nMODE = \"agent\"\n\
        [health]\nstay_up = \"5s\"\nhttp = \"http://127.0.0.1:8080/health\"\n\
        [hooks.pre_switch]\ncommand = [\"bin/migrate\"]\ntimeout = \"2m\"\n";
    let valid = zip_of(&[
        Dir("bin/"),
        File("bin/collector", b"#!/bin/sh\necho collector 1.0.0\n", 0o755),
        File(
            "config/default.toml",
            "interval = \"10s\"\n".repeat(20).as_bytes(),
            0o644,
        ),
        File("data/blob.bin", &pseudo_random(600, 42), 0o644),
        File("fleetcast.toml", config, 0o644),
        File("VERSION", b"1.0.0", 0o644),
        Link("bin/current", "collector"),
        Link("config/up", "../bin"),
    ]);
    let one = zip_of(&[File("a", &[7u8; 300], 0o644)]);
    let stored = zip_with(
        &[File("a", b"stored content", 0o644)],
        SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
    );
    // Central directory fields of the one entry in `stored`: sizes at +20 and +24.
    let cd = find(&stored, CENTRAL);
    let eocd = find(&one, EOCD);
    let mut out = vec![
        seed("valid-package.zip", valid.clone()),
        seed("valid-stored.zip", stored.clone()),
        seed(
            "valid-zip64.zip",
            zip_with(
                &[File("big", b"small but zip64", 0o644)],
                SimpleFileOptions::default().large_file(true),
            ),
        ),
        seed(
            "empty-archive.zip",
            b"PK\x05\x06"
                .iter()
                .copied()
                .chain([0u8; 18])
                .collect::<Vec<_>>(),
        ),
        seed(
            "duplicate-entries.zip",
            replace_all(
                zip_of(&[
                    File("bin/app", b"good", 0o755),
                    File("bin/apq", b"evil", 0o755),
                ]),
                b"bin/apq",
                b"bin/app",
            ),
        ),
        seed(
            "non-utf8-name.zip",
            replace_all(
                zip_of(&[File("bin/xx", b"x", 0o644)]),
                b"bin/xx",
                b"bin/\xff\xfe",
            ),
        ),
        seed(
            "nul-in-name.zip",
            replace_all(
                zip_of(&[File("bin/xx", b"x", 0o644)]),
                b"bin/xx",
                b"bin/x\0",
            ),
        ),
        seed("truncated.zip", valid[..valid.len() / 2].to_vec()),
        seed(
            "truncated-central-directory.zip",
            valid[..valid.len() - 30].to_vec(),
        ),
        seed("corrupt-content.zip", {
            let mut b = zip_of(&[File("data.bin", &pseudo_random(3000, 5), 0o644)]);
            for x in &mut b[600..610] {
                *x ^= 0xff;
            }
            b
        }),
        seed("crc-mismatch.zip", {
            let mut b = stored.clone();
            b[cd + 16] ^= 0xff;
            b[14] ^= 0xff;
            b
        }),
        seed("eocd-only.zip", one[eocd..].to_vec()),
        seed("not-a-zip", b"this is not a zip".to_vec()),
    ];
    // Prefixed with junk (a self-extracting stub): offsets no longer match.
    let mut prefixed = b"#!/bin/sh\nexit 0\n".to_vec();
    prefixed.extend_from_slice(&stored);
    out.push(seed("junk-prefix.zip", prefixed));
    // Archives with fields overwritten: (name, archive, [(offset, new bytes)]), one line each.
    #[rustfmt::skip]
    let overwritten: &[(&str, &[u8], &[Overwrite])] = &[
        ("huge-declared-size.zip", &stored, &[(cd + 24, &[0xff; 4])]),
        ("lying-compressed-size.zip", &stored, &[(cd + 20, &[0xff, 0xff, 0xff, 0x7f])]),
        ("declared-shorter.zip", &stored, &[(cd + 24, &[2, 0, 0, 0])]),
        ("eocd-claims-65535-entries.zip", &one, &[(eocd + 8, &[0xff, 0xff]), (eocd + 10, &[0xff, 0xff])]),
        ("eocd-offset-out-of-range.zip", &one, &[(eocd + 16, &[0xff, 0xff, 0xff, 0x7f])]),
        ("eocd-size-out-of-range.zip", &one, &[(eocd + 12, &[0xff, 0xff, 0xff, 0x7f])]),
        ("unknown-compression-method.zip", &stored, &[(cd + 10, &[99, 0]), (8, &[99, 0])]),
    ];
    out.extend(overwritten.iter().map(|(name, archive, fields)| {
        let mut b = archive.to_vec();
        for (at, v) in *fields {
            b[*at..*at + v.len()].copy_from_slice(v);
        }
        seed(name, b)
    }));
    // The seeds that are only their entries zipped: a table, one line a seed.
    let long_target = "a/".repeat(2100);
    let bomb = vec![0u8; 3 << 20];
    // Issue 16: each link's text stays inside, but through `y` the second climbs out.
    let chain = [
        File("a1/a2/a3/a4/a5/a6/a7/a8/keep", b"x", 0o644),
        Link("a1/a2/a3/a4/a5/a6/a7/a8/y", "../../../../../../../../c"),
        Link(
            "z",
            "a1/a2/a3/a4/a5/a6/a7/a8/y/../../../../../../../../../etc/passwd",
        ),
    ];
    let spread: Vec<Item> = ["z0", "z1", "z2", "z3"]
        .into_iter()
        .map(|name| File(name, &[0u8; 600_000], 0o644))
        .collect();
    #[rustfmt::skip]
    let entries: &[(&str, &[Item])] = &[
        ("path-traversal.zip", &[File("bin/ok", b"x", 0o755), File("../../etc/cron.d/evil", b"* * * * * root sh", 0o644)]),
        ("path-traversal-inner.zip", &[File("a/../../b", b"x", 0o644)]),
        ("backslash-traversal.zip", &[File("a\\..\\..\\b", b"x", 0o644)]),
        ("absolute-path.zip", &[File("/etc/passwd", b"root::0:0::/:/bin/sh", 0o644)]),
        ("drive-path.zip", &[File("C:/windows/x", b"x", 0o644)]),
        ("symlink-outside.zip", &[File("bin/ok", b"x", 0o755), Link("bin/shadow", "../../../etc/shadow")]),
        ("symlink-absolute.zip", &[Link("lib", "/etc/passwd")]),
        ("symlink-to-root.zip", &[Link("a/self", "..")]),
        ("link-through-link.zip", &[Link("d", "sub"), File("d/x", b"x", 0o644)]),
        ("link-to-link-dir.zip", &[Dir("sub/"), Link("d", "sub"), Link("e", "d/x")]),
        ("symlink-chain-outside.zip", &chain),
        ("symlink-long-target.zip", &[Link("l", &long_target)]),
        ("duplicate-after-normalising.zip", &[Dir("bin/"), File("bin", b"x", 0o644)]),
        ("setuid-mode.zip", &[File("bin/su", b"x", 0o4755)]),
        ("zip-bomb.zip", &[File("bomb", &bomb, 0o644)]),
        ("zip-bomb-spread.zip", &spread),
        ("bad-package-config.zip", &[File("bin/ok", b"x", 0o755), File("fleetcast.toml", b"command = []\n", 0o644)]),
        ("package-config-not-utf8.zip", &[File("fleetcast.toml", b"command = [\"\xff\"]\n", 0o644)]),
        ("package-config-is-link.zip", &[File("x", b"x", 0o644), Link("fleetcast.toml", "x")]),
        ("package-config-huge-timeout.zip", &[File("fleetcast.toml", b"[hooks.post_switch]\ncommand = [\"x\"]\ntimeout = \"99999999999999999999y\"\n", 0o644)]),
    ];
    out.extend(
        entries
            .iter()
            .map(|(name, items)| seed(name, zip_of(items))),
    );
    out
}

/// Seeds are written as JSON values, the wire form, and turned into MessagePack through the
/// Rust type: so they need no struct literals that each new optional field would break.
fn sample_manifest() -> Value {
    let (files, built) = sample_tree();
    json!({
        "app": "collector",
        "version": "1.2.3",
        "tree": serde_json::to_value(TreeRoot::of(&built, &files)).expect("json"),
        "created": rfc3339(now() - Duration::days(1)),
        "expires": rfc3339(now() + Duration::days(30)),
    })
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

fn blake3_hex(data: &[u8]) -> String {
    chunking::ChunkId::of(data).to_hex()
}

fn text(v: &Value) -> String {
    serde_json::to_string(v).expect("json")
}

/// The value as a signed manifest (JSON), signed by the test key.
fn signed(m: &Value) -> Value {
    signed_json(&text(m))
}

fn bytes(v: &Value) -> Vec<u8> {
    text(v).into_bytes()
}

/// `v` decoded as `T` (it must: a seed that does not decode tests nothing valid) and encoded
/// as MessagePack, with named fields as the services send.
fn msgpack<T: serde::Serialize + serde::de::DeserializeOwned>(v: &Value) -> Vec<u8> {
    let value: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("seed {v} does not decode: {e}"));
    Encoding::MsgPack.encode(&value).expect("msgpack")
}

fn manifests() -> Vec<Seed> {
    let m = sample_manifest();
    let good = signed(&m);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut m = sample_manifest();
        f(&mut m);
        bytes(&signed(&m))
    };
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut s = good.clone();
        f(&mut s);
        bytes(&s)
    };
    let other_key =
        SecretKey::from_text("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=").expect("key");
    let unknown = json!({
        "manifest": text(&m),
        "signatures": [{
            "key_id": other_key.public().id(),
            "signature": B64.encode(other_key.sign(text(&m).as_bytes())),
        }],
    });
    let mut prerelease = m.clone();
    prerelease["version"] = "1.2.3-rc.1+build.5".into();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    vec![
        seed("signed-valid.json", bytes(&good)),
        seed("signed-valid.msgpack", msgpack::<SignedManifest>(&good)),
        seed("manifest-text.json", text(&m)),
        seed("manifest-prerelease.json", text(&prerelease)),
        seed("rollback-directive.json", with(&|m| m["rollback_from"] = "1.3.0".into())),
        seed("signed-by-unknown-key.json", bytes(&unknown)),
        seed("tampered.json", edit(&|s| {
            let t = s["manifest"].as_str().expect("text").replace("1.2.3", "1.2.4");
            s["manifest"] = t.into();
        })),
        seed("unsigned.json", edit(&|s| s["signatures"] = json!([]))),
        seed("signature-not-base64.json", edit(&|s| s["signatures"][0]["signature"] = "!!not base64!!".into())),
        seed("signature-too-short.json", edit(&|s| s["signatures"][0]["signature"] = "AAAA".into())),
        seed("same-signature-twice.json", edit(&|s| {
            let sig = s["signatures"][0].clone();
            s["signatures"] = json!([sig.clone(), sig]);
        })),
        seed("many-unknown-signatures.json", edit(&|s| {
            let mut sigs: Vec<Value> = (0..20)
                .map(|i| json!({"key_id": format!("{i:016x}"), "signature": "AAAA"}))
                .collect();
            sigs.push(s["signatures"][0].clone());
            s["signatures"] = sigs.into();
        })),
        seed("expired.json", with(&|m| m["expires"] = rfc3339(now() - Duration::seconds(1)).into())),
        // The paths are in the tree's nodes now (the `tree` target's seeds); here its root.
        seed("tree-root-not-hex.json", with(&|m| m["tree"]["root"] = "not hex".into())),
        seed("tree-root-uppercase.json", with(&|m| {
            let upper = m["tree"]["root"].as_str().expect("root").to_uppercase();
            m["tree"]["root"] = upper.into();
        })),
        seed("tree-root-short.json", with(&|m| m["tree"]["root"] = "abc".into())),
        seed("tree-len-over-u32.json", with(&|m| m["tree"]["len"] = 4_294_967_296u64.into())),
        seed("tree-unknown-field.json", with(&|m| m["tree"]["index_key"] = "collector.1.2.3".into())),
        // The format before the tree: the files listed in the manifest itself.
        seed("files-instead-of-tree.json", with(&|m| {
            let files = json!([{"path": "bin/collector", "mode": 0o755, "size": 3, "blake3": blake3_hex(b"abc")}]);
            let object = m.as_object_mut().expect("object");
            object.remove("tree");
            object.insert("files".into(), files);
        })),
        seed("bad-app-name.json", with(&|m| m["app"] = "../collector".into())),
        seed("huge-numbers.json", br#"{"app":"collector","version":"1.0.0","tree":{"root":"","len":4294967296,"files":18446744073709551616,"bytes":-1},"created":"2026-01-01T00:00:00Z","expires":"9999-12-31T23:59:60Z"}"#.to_vec()),
        seed("odd-dates.json", br#"{"app":"collector","version":"1.0.0","tree":{"root":"af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262","len":0,"files":0,"bytes":0},"created":"0000-01-01T00:00:00-23:59","expires":"2026-12-31T23:59:60.999999999+23:59"}"#.to_vec()),
        seed("unknown-field.json", br#"{"manifest":"{}","signatures":[],"threshold":2}"#.to_vec()),
        seed("deep-nesting.json", deep),
        seed("not-json", b"{\"manifest\": \"\\ud800\", ".to_vec()),
        // Roots and timestamps (the trust metadata): as texts, which the target also re-signs.
        seed("root-text.json", text(&root(1, 1, 1))),
        seed("root-threshold-above-keys.json", text(&root(1, 3, 1))),
        seed("root-threshold-zero.json", text(&root(1, 0, 1))),
        seed("root-version-max.json", text(&root(u64::MAX, 1, 1))),
        seed("root-bad-key.json", text(&json!({
            "version": 1, "expires": rfc3339(now() + Duration::days(1)),
            "root": {"keys": ["AAAA"], "threshold": 1},
            "signing": {"keys": [], "threshold": 1},
        }))),
        seed("root-signed-by-nobody.json", bytes(&json!({"signed": text(&root(1, 1, 1)), "signatures": []}))),
        seed("timestamp-text.json", text(&json!({
            "issued": rfc3339(now()), "expires": rfc3339(now() + Duration::hours(1)),
            "root_version": 3, "releases": {"collector": "1.2.3", "../x": "not-a-version"},
        }))),
        seed("timestamp-expired.json", text(&json!({
            "issued": rfc3339(now() - Duration::hours(2)), "expires": rfc3339(now() - Duration::hours(1)),
            "root_version": 0, "releases": {},
        }))),
    ]
}

/// A root whose root role is the test key with `threshold`, and `signing` copies of it.
fn root(version: u64, threshold: usize, signing: usize) -> Value {
    let key = fleetcast_fuzz::test_key()
        .public()
        .to_text()
        .trim()
        .to_string();
    json!({
        "version": version,
        "expires": rfc3339(now() + Duration::days(365)),
        "root": {"keys": [key.clone()], "threshold": threshold},
        "signing": {"keys": vec![key; signing], "threshold": 1},
    })
}

fn events() -> Vec<Seed> {
    let good = signed(&sample_manifest());
    let rejection =
        json!({"code": "path_traversal", "message": "entry \"../x\" escapes the package"});
    let stored = json!({
        "app": "collector", "version": "1.2.3", "files": 2, "total_bytes": 12, "chunks": 2,
        "new_chunks": 1, "new_stored_bytes": 10, "tree_nodes": 3, "new_tree_nodes": 1,
    });
    let app = json!({
        "app": "collector", "state": "running", "running": "1.2.3", "previous": "1.0.0",
        "uptime_s": 3600,
    });
    let mut out = Vec::new();
    macro_rules! both {
        ($name:expr, $ty:ty, $value:expr) => {{
            let value: Value = $value;
            out.push(seed(&format!("{}.json", $name), bytes(&value)));
            out.push(seed(&format!("{}.msgpack", $name), msgpack::<$ty>(&value)));
        }};
    }
    both!(
        "release-published",
        ReleasePublished,
        json!({
            "app": "collector", "version": "1.2.3", "object": "collector-1.2.3-0123456789abcdef.zip",
            "size": 1234, "blake3": "ab".repeat(32), "published_by": "ci",
        })
    );
    both!(
        "package-source",
        PackageSource,
        json!({"kind": "drop_folder", "file": "collector-1.2.3.zip"})
    );
    both!(
        "package-detected",
        PackageDetected,
        json!({
            "app": "collector", "version": "1.2.3", "object": "collector-1.2.3.zip", "size": 1,
            "blake3": "cd".repeat(32), "source": {"kind": "ci"},
        })
    );
    both!("rejection", Rejection, rejection.clone());
    both!("reject-code", RejectCode, json!("compression_ratio"));
    both!(
        "package-rejected",
        PackageRejected,
        json!({
            "app": "collector", "source": {"kind": "drop_folder", "file": "x.zip"},
            "reason": rejection.clone(),
        })
    );
    both!(
        "event-rejected",
        EventRejected,
        json!({
            "stage": "signer", "subject": "fleetcast.v1.package.detected", "reason": rejection.clone(),
        })
    );
    both!(
        "release-signed",
        ReleaseSigned,
        json!({
            "app": "collector", "version": "1.2.3", "object": "collector-1.2.3.zip",
            "blake3": "ef".repeat(32), "manifest": good.clone(),
        })
    );
    both!(
        "rollback-requested",
        RollbackRequested,
        json!({
            "app": "collector", "to": "1.0.0", "from": "1.2.3", "ring": "canary", "requested_by": "ops",
        })
    );
    both!(
        "rollback-signed",
        RollbackSigned,
        json!({
            "app": "collector", "to": "1.0.0", "from": "1.2.3", "manifest": good.clone(),
        })
    );
    both!(
        "release-rejected",
        ReleaseRejected,
        json!({
            "app": "collector", "version": "1.2.3", "stage": "distributor", "reason": rejection.clone(),
        })
    );
    both!("release-stored", ReleaseStored, stored.clone());
    both!("release-state", ReleaseState, json!("stored"));
    both!(
        "release-record",
        ReleaseRecord,
        json!({
            "app": "collector", "version": "1.2.3", "state": "stored", "reason": rejection.clone(),
            "manifest": good.clone(), "stored": stored, "updated": rfc3339(now()),
        })
    );
    both!(
        "chunk-ref",
        ChunkRef,
        json!({"id": blake3_hex(b"abc"), "len": 3})
    );
    both!(
        "desired-state",
        DesiredState,
        json!({
            "app": "collector", "ring": "canary", "version": "1.2.3", "manifest": good.clone(),
            "slot": true,
        })
    );
    both!(
        "slot-request",
        SlotRequest,
        json!({
            "agent_id": "host-1", "app": "collector", "ring": "canary", "version": "1.2.3",
        })
    );
    both!(
        "slot-reply",
        SlotReply,
        json!({
            "granted": false, "retry_after_ms": 5000, "reason": "all slots taken",
        })
    );
    both!("app-state", AppState, json!("waiting_for_slot"));
    both!(
        "agent-status",
        AgentStatus,
        json!({
            "agent_id": "host-1", "app": "collector", "state": "refused", "version": "1.2.3",
            "progress_bytes": 10, "reason": "manifest expired", "at": rfc3339(now()),
        })
    );
    both!(
        "agent-heartbeat",
        AgentHeartbeat,
        json!({
            "agent_id": "host-1", "host": "host-1.example", "ring": "canary",
            "labels": {"site": "paris"}, "apps": [app.clone()], "at": rfc3339(now()),
        })
    );
    both!("app-heartbeat", AppHeartbeat, app);
    // Hostile encodings.
    out.extend([
        seed(
            "msgpack-array32-huge-len",
            b"\xdd\xff\xff\xff\xff\xa1a".to_vec(),
        ),
        seed(
            "msgpack-map32-huge-len",
            b"\xdf\xff\xff\xff\xff\xa3app".to_vec(),
        ),
        seed(
            "msgpack-str32-huge-len",
            b"\x81\xa3app\xdb\xff\xff\xff\xffab".to_vec(),
        ),
        seed(
            "msgpack-bin32-huge-len",
            b"\x81\xa3app\xc6\xff\xff\xff\xffab".to_vec(),
        ),
        seed("msgpack-deep-nesting", [0x91u8].repeat(5000)),
        seed(
            "msgpack-ext-and-nil",
            b"\x82\xa3app\xd4\x01\x00\xa7version\xc0".to_vec(),
        ),
        seed(
            "msgpack-positional-struct",
            b"\x93\xa9collector\xa51.2.3\x90".to_vec(),
        ),
        seed("msgpack-invalid-utf8", b"\x81\xa3app\xa2\xff\xfe".to_vec()),
        seed(
            "json-deep-nesting",
            format!("{}{}", "{\"a\":".repeat(3000), "}".repeat(3000)),
        ),
        seed("json-truncated", bytes(&stored)[..40].to_vec()),
        seed(
            "json-bad-semver",
            br#"{"agent_id":"a","app":"b","ring":"c","version":"01.2.3"}"#.to_vec(),
        ),
        seed(
            "json-huge-semver",
            format!(
                r#"{{"agent_id":"a","app":"b","ring":"c","version":"1.2.{}"}}"#,
                "9".repeat(40)
            ),
        ),
        seed(
            "json-leap-second",
            br#"{"agent_id":"a","app":"b","state":"running","at":"2016-12-31T23:59:60Z"}"#.to_vec(),
        ),
        seed(
            "json-bad-date",
            br#"{"agent_id":"a","app":"b","state":"running","at":"2026-02-30T25:61:00+99:00"}"#
                .to_vec(),
        ),
        seed(
            "json-unknown-variant",
            br#"{"kind":"usb_stick","file":"x"}"#.to_vec(),
        ),
        seed(
            "json-duplicate-field",
            br#"{"granted":true,"granted":false}"#.to_vec(),
        ),
        seed(
            "json-escapes",
            br#"{"code":"invalid_name","message":"\u0000\ud83d\ude00\\"}"#.to_vec(),
        ),
    ]);
    out
}

fn tree_file(path: &str, content: &[u8], mode: u32) -> TreeFile {
    let hash = blake3_hex(content);
    let chunks = if content.is_empty() {
        Vec::new()
    } else {
        vec![chunking::chunk_ref(
            &chunking::ChunkId::of(content),
            content.len(),
        )]
    };
    TreeFile {
        entry: FileEntry {
            path: path.into(),
            mode,
            size: content.len() as u64,
            blake3: hash,
            link: None,
        },
        chunks: ChunkList::Listed(chunks),
    }
}

/// A release's files as the package gives them (path order): a file of one chunk, a link, an
/// empty file, one of two chunks, one of 200 chunks (more than a leaf lists: a chunk tree of
/// its own), and enough others for a level of branches.
fn sample_tree() -> (Vec<TreeFile>, Built) {
    let mut files = vec![
        tree_file("bin/collector", b"#!/bin/sh\necho collector 1.2.3\n", 0o755),
        tree_file("data/empty", b"", 0o644),
        tree_file("VERSION", b"1.2.3", 0o644),
    ];
    let mut link = tree_file("bin/current", b"collector", 0o777);
    link.entry.link = Some("collector".into());
    link.chunks = ChunkList::Listed(Vec::new());
    files.push(link);
    let chunked = |path: &str, n: u32| {
        let chunks: Vec<ChunkRef> = (0..n)
            .map(|i| ChunkRef {
                id: blake3_hex(format!("{path} {i}").as_bytes()),
                len: 65_536,
            })
            .collect();
        TreeFile {
            entry: FileEntry {
                path: path.into(),
                mode: 0o644,
                size: u64::from(n) * 65_536,
                blake3: blake3_hex(path.as_bytes()),
                link: None,
            },
            chunks: ChunkList::Listed(chunks),
        }
    };
    files.push(chunked("data/two-chunks.bin", 2));
    files.push(chunked("data/big.bin", 200));
    for i in 0..30 {
        let body = format!("module {i}");
        files.push(tree_file(
            &format!("lib/mod_{i:02}.so"),
            body.as_bytes(),
            0o644,
        ));
    }
    files.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    let built = tree::build(&files).expect("the sample tree builds");
    (files, built)
}

/// What a node is, as a walk reads it: named in the seed's file name.
fn node_kind(bytes: &[u8]) -> &'static str {
    let name = NodeRef::of(bytes);
    let mut files = Walk::files(name, u64::MAX);
    let mut chunks = Walk::chunks(name, u64::MAX);
    if files.supply(&[bytes]).is_ok() {
        if files.wanted().is_empty() {
            "files"
        } else {
            "branch"
        }
    } else if chunks.supply(&[bytes]).is_ok() {
        "chunks"
    } else {
        "unreadable"
    }
}

/// `bytes` with the first `from` replaced by `to` (same length).
fn patch_once(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{from:x?} not in {:x?}", &bytes[..bytes.len().min(60)]));
    bytes[at..at + to.len()].copy_from_slice(to);
    bytes
}

/// The one leaf of a tree of `files` (built without the checks a reader makes).
fn leaf_of(files: &[TreeFile]) -> Vec<u8> {
    let built = tree::build(files).expect("build");
    assert_eq!(built.nodes.len(), 1);
    built.nodes[0].1.clone()
}

fn tree_nodes() -> Vec<Seed> {
    let (_, built) = sample_tree();
    let mut out: Vec<Seed> = built
        .nodes
        .iter()
        .enumerate()
        .map(|(i, (r, bytes))| {
            let root = if *r == built.root { "-root" } else { "" };
            seed(
                &format!("node-{i:02}-{}{root}", node_kind(bytes)),
                bytes.clone(),
            )
        })
        .collect();
    let root = built
        .nodes
        .iter()
        .find(|(r, _)| *r == built.root)
        .map(|(_, b)| b.clone())
        .expect("the root is a node");
    let (_, first_leaf) = built
        .nodes
        .iter()
        .find(|(_, b)| node_kind(b) == "files")
        .expect("a leaf of files");
    let mut flipped = first_leaf.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    // A branch is [kind 2, level, [], [], children]: its level patched past the deepest.
    let at_level = |level: u8| {
        let mut b = root.clone();
        assert_eq!(&b[..2], b"\x95\x02", "the root is a branch");
        b[2] = level;
        b
    };
    let pair = [
        tree_file("bin/aa", b"a", 0o644),
        tree_file("bin/zz", b"z", 0o644),
    ];
    // [prefix, suffix, ...]: the second path shares "bin/" and ends in "zz".
    let duplicate = patch_once(leaf_of(&pair), b"\xa2zz", b"\xa2aa");
    let out_of_order = patch_once(leaf_of(&pair), b"\xa2zz", b"\xa2a0");
    let first_prefix = patch_once(leaf_of(&pair), b"\x98\x00\xa6bin/aa", b"\x98\x05\xa6bin/aa");
    let prefix_past_end = patch_once(leaf_of(&pair), b"\x98\x04\xa2zz", b"\x98\x7f\xa2zz");
    out.extend([
        seed("truncated-root", root[..root.len() / 2].to_vec()),
        seed(
            "truncated-leaf",
            first_leaf[..first_leaf.len() - 1].to_vec(),
        ),
        seed("flipped-leaf", flipped),
        seed("branch-too-deep", at_level(17)),
        seed("branch-at-level-0", at_level(0)),
        seed("leaf-duplicate-path", duplicate),
        seed("leaf-out-of-order", out_of_order),
        seed("leaf-first-prefix-not-0", first_prefix),
        seed("leaf-prefix-past-end", prefix_past_end),
        seed(
            "leaf-huge-file-count",
            b"\x95\x00\x00\xdd\xff\xff\xff\xff".to_vec(),
        ),
        seed(
            "leaf-huge-chunk-count",
            b"\x95\x01\x00\x90\xdd\x7f\xff\xff\xff".to_vec(),
        ),
        seed(
            "leaf-hash-not-32-bytes",
            b"\x95\x01\x00\x90\x91\x92\xc4\x03abc\x01\x90".to_vec(),
        ),
        seed("unknown-kind", b"\x95\x07\x00\x90\x90\x90".to_vec()),
    ]);
    // A leaf of one file at a path a reader must refuse.
    let refused_paths = [
        ("leaf-path-traversal", "../etc/passwd"),
        ("leaf-absolute-path", "/etc/passwd"),
        ("leaf-drive-path", "c:\\x"),
        ("leaf-nul-in-path", "bin/x\0y"),
        ("leaf-empty-path", ""),
    ];
    out.extend(
        refused_paths.map(|(name, path)| seed(name, leaf_of(&[tree_file(path, b"x", 0o644)]))),
    );
    out.extend(chunks());
    out
}

/// Stored chunks (tree nodes are stored alike) and file content to chunk.
fn chunks() -> Vec<Seed> {
    let text = b"fleetcast ".repeat(2000);
    let zeros_bomb = {
        let mut b = vec![1u8];
        b.extend(zstd::bulk::compress(&vec![0u8; 2 << 20], 3).expect("zstd"));
        b
    };
    // A frame without its content size in the header (streamed).
    let streamed = {
        let mut b = vec![1u8];
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).expect("zstd");
        enc.write_all(&text).expect("zstd");
        b.extend(enc.finish().expect("zstd"));
        b
    };
    let zstd_text = chunking::encode_stored(&text).expect("encode");
    let mut lying_size = zstd_text.clone();
    // Frame header: magic (4), descriptor, then the content size; claim far more.
    lying_size[6] = 0xff;
    vec![
        seed(
            "chunk-raw",
            chunking::encode_stored(&pseudo_random(2000, 3)).expect("encode"),
        ),
        seed("chunk-zstd", zstd_text),
        seed("chunk-zstd-bomb", zeros_bomb),
        seed("chunk-zstd-streamed", streamed),
        seed("chunk-zstd-lying-size", lying_size),
        seed(
            "chunk-zstd-skippable-frame",
            b"\x01\x50\x2a\x4d\x18\x04\x00\x00\x00abcd".to_vec(),
        ),
        seed("chunk-unknown-encoding", b"\x07abc".to_vec()),
        seed("chunk-empty-raw", vec![0u8]),
        seed("file-content", text.clone()),
        seed("file-content-random", pseudo_random(40_000, 11)),
    ]
}
