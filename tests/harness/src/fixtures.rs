//! Zip packages for tests and benchmarks, built in code: good ones and the hostile ones each
//! rejection reason is proved with (named after the failure they provoke).

use std::io::Write;
use std::path::Path;

use zip::write::SimpleFileOptions;

#[derive(Default, Clone)]
pub struct PackageBuilder {
    entries: Vec<(String, Content)>,
}

#[derive(Clone)]
enum Content {
    File(Vec<u8>, u32),
    Link(String),
}

impl PackageBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.entries
            .push((path.into(), Content::File(data.into(), mode)));
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries
            .push((path.into(), Content::Link(target.into())));
        self
    }

    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        self.entries
            .iter()
            .filter_map(|(p, c)| match c {
                Content::File(d, _) => Some((p.clone(), d.clone())),
                Content::Link(_) => None,
            })
            .collect()
    }

    /// Builds the archive in memory. Incompressible-looking data is stored, the rest deflated,
    /// as packaging tools do.
    pub fn build(&self) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (path, content) in &self.entries {
            match content {
                Content::File(data, mode) => {
                    let opts = SimpleFileOptions::default()
                        .unix_permissions(*mode)
                        .large_file(data.len() > u32::MAX as usize / 2);
                    w.start_file(path.as_str(), opts).expect("zip entry");
                    w.write_all(data).expect("zip write");
                }
                Content::Link(target) => {
                    w.add_symlink(path.as_str(), target.as_str(), SimpleFileOptions::default())
                        .expect("zip link");
                }
            }
        }
        w.finish().expect("zip finish").into_inner()
    }

    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.build())
    }
}

/// A small, valid application package.
pub fn sample_package(version: &str) -> PackageBuilder {
    PackageBuilder::new()
        .file(
            "bin/collector",
            format!("#!/bin/sh\necho collector {version}\n"),
            0o755,
        )
        .file(
            "config/default.toml",
            "interval = \"10s\"\n".repeat(50),
            0o644,
        )
        .file("data/blob.bin", pseudo_random(300_000, 42), 0o644)
        .file("VERSION", version.to_string(), 0o644)
        .symlink("bin/current", "collector")
}

/// Deterministic incompressible bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A rebuilt executable: `base` with a few bytes changed every 24 KiB (addresses and offsets
/// moved throughout), so nearly every chunk is new while a binary patch from the base is small.
pub fn rebuilt(base: &[u8], build: u64) -> Vec<u8> {
    let mut out = base.to_vec();
    for (i, at) in (0..out.len().saturating_sub(16))
        .step_by(24 << 10)
        .enumerate()
    {
        out[at..at + 8].copy_from_slice(&(build * 1_000_003 + i as u64).to_le_bytes());
    }
    out
}

/// Hostile archives, one per rejection reason the pipeline must give.
pub mod hostile {
    use super::*;

    /// A harmless program, beside which each hostile archive puts its one bad entry: the
    /// refusal is then for that entry, not for an archive with nothing to run.
    fn beside_a_good_file() -> PackageBuilder {
        PackageBuilder::new().file("bin/ok", "x", 0o755)
    }

    pub fn path_traversal() -> Vec<u8> {
        beside_a_good_file()
            .file("../../etc/cron.d/evil", "* * * * * root sh", 0o644)
            .build()
    }

    /// A file name of 256 bytes: every host's filesystem refuses it ("File name too long").
    pub fn name_too_long() -> Vec<u8> {
        beside_a_good_file()
            .file(&format!("doc/{}", "n".repeat(256)), "x", 0o644)
            .build()
    }

    /// `bin/tool` is a file and the folder of `bin/tool/config` ("File exists" on a host).
    pub fn file_and_folder() -> Vec<u8> {
        PackageBuilder::new()
            .file("bin/tool", "x", 0o755)
            .file("bin/tool/config", "y", 0o644)
            .build()
    }

    /// A zip with no entry at all.
    pub fn no_file() -> Vec<u8> {
        PackageBuilder::new().build()
    }

    /// A package whose own `fleetcast.toml` names an empty command.
    pub fn bad_package_config() -> Vec<u8> {
        beside_a_good_file()
            .file("fleetcast.toml", "command = []\n", 0o644)
            .build()
    }

    pub fn absolute_path() -> Vec<u8> {
        PackageBuilder::new()
            .file("/etc/passwd", "root::0:0::/:/bin/sh", 0o644)
            .build()
    }

    pub fn symlink_outside() -> Vec<u8> {
        beside_a_good_file()
            .symlink("bin/shadow", "../../../etc/shadow")
            .build()
    }

    /// Issue 16's chain of links: `a1/…/a8/y` stays inside, and so does the text of `z`, but
    /// the file system follows `y` (to `c` at the top) and the nine `..` after it climb out to
    /// `/etc/passwd`. A check of each link's text alone passes it.
    pub fn symlink_chain_outside() -> Vec<u8> {
        let deep = "a1/a2/a3/a4/a5/a6/a7/a8";
        beside_a_good_file()
            .file(&format!("{deep}/keep"), "x", 0o644)
            .symlink(&format!("{deep}/y"), "../../../../../../../../c")
            .symlink("z", &format!("{deep}/y/{}etc/passwd", "../".repeat(9)))
            .build()
    }

    /// Two entries named `bin/app`: the zip writer refuses to make one, so the second name is
    /// patched in the finished archive (local header and central directory alike).
    pub fn duplicate_entries() -> Vec<u8> {
        let bytes = PackageBuilder::new()
            .file("bin/app", "good", 0o755)
            .file("bin/apq", "evil", 0o755)
            .build();
        fleetcast_package::testing::replace_all(bytes, b"bin/apq", b"bin/app")
    }

    /// 64 MiB of zeros deflated to about 64 KiB: over any sane ratio limit.
    pub fn zip_bomb() -> Vec<u8> {
        PackageBuilder::new()
            .file("bomb", vec![0u8; 64 << 20], 0o644)
            .build()
    }

    pub fn too_many_entries(n: usize) -> Vec<u8> {
        (0..n)
            .fold(PackageBuilder::new(), |b, i| {
                b.file(&format!("f/{i}"), "x", 0o644)
            })
            .build()
    }

    /// A valid archive cut in half.
    pub fn truncated() -> Vec<u8> {
        let mut bytes = sample_package("1.0.0").build();
        bytes.truncate(bytes.len() / 2);
        bytes
    }

    /// A valid directory whose file data is damaged: only reading the content finds it (CRC).
    pub fn corrupt_content() -> Vec<u8> {
        let mut bytes = PackageBuilder::new()
            .file("data.bin", super::pseudo_random(50_000, 5), 0o644)
            .build();
        // Local header is 30 bytes + name; flip bytes well inside the stored data.
        for b in &mut bytes[1000..1010] {
            *b ^= 0xff;
        }
        bytes
    }
}
