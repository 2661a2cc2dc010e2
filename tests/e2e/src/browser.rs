//! The tracker's pages as a person sees them: headless Chromium loads a page, runs its
//! scripts against the live API, and the tests read the DOM it ends with, or a screenshot of
//! it (decoded here, so a test can count the pixels of a colour: a banner, a halt mark).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// How long (virtual time) Chromium lets a page's scripts run before the DOM or screenshot is
/// taken: its first refresh and a few more.
const VIRTUAL_TIME_BUDGET_MS: u32 = 5000;

/// The screenshots' size: wide enough for the tables and the timeline plot.
const WINDOW: (u32, u32) = (1280, 1000);

/// Runs Chromium on `http://127.0.0.1:{port}{path}` with `args` (what to output).
async fn chromium(port: u16, path: &str, args: Vec<String>) -> std::process::Output {
    let url = format!("http://127.0.0.1:{port}{path}");
    let chromium = std::env::var("FLEETCAST_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let profile = tempfile::tempdir().expect("profile dir");
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                // Colours exactly as the CSS says them, whatever the machine's display.
                "--force-color-profile=srgb",
                "--hide-scrollbars",
            ])
            .arg(format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}"))
            .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
            .arg(profile_arg)
            .args(args)
            .arg(&url)
            .output()
    })
    .await
    .expect("join")
    .expect("chromium runs (apt-get install chromium; .ci/run installs it)");
    drop(profile);
    out
}

/// The DOM of the tracker's page `path` (e.g. `/history?app=web`) on `port`, once its scripts
/// ran.
pub async fn page_dom(port: u16, path: &str) -> String {
    let out = chromium(port, path, vec!["--dump-dom".into()]).await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A screenshot of the tracker's page `path` on `port`, saved as `file` (for a person to look
/// at), decoded.
pub async fn page_screenshot(port: u16, path: &str, file: &Path) -> Screenshot {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).expect("screenshot dir");
    }
    let _ = std::fs::remove_file(file);
    let out = chromium(port, path, vec![format!("--screenshot={}", file.display())]).await;
    let bytes = std::fs::read(file).unwrap_or_else(|e| {
        panic!(
            "no screenshot {} ({e}); chromium said: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut shot = Screenshot::decode(&bytes)
        .unwrap_or_else(|e| panic!("screenshot {}: {e:#}", file.display()));
    shot.file = file.to_path_buf();
    shot
}

/// A decoded screenshot: RGB pixels, row by row.
pub struct Screenshot {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<[u8; 3]>,
    /// Where it was saved.
    pub file: PathBuf,
}

impl Screenshot {
    /// How many pixels are exactly `rgb`.
    pub fn count(&self, rgb: [u8; 3]) -> usize {
        self.pixels.iter().filter(|p| **p == rgb).count()
    }

    /// How many pixels are not (nearly) white or the page's background: ink.
    pub fn ink(&self) -> usize {
        self.pixels
            .iter()
            .filter(|p| p.iter().any(|c| *c < 200))
            .count()
    }

    /// Decodes a PNG as Chromium writes screenshots: 8 bits per channel, RGB or RGBA, not
    /// interlaced.
    pub fn decode(png: &[u8]) -> anyhow::Result<Screenshot> {
        use std::io::Read;
        let body = png
            .strip_prefix(b"\x89PNG\r\n\x1a\n")
            .context("not a PNG")?;
        let (mut width, mut height, mut channels) = (0, 0, 0);
        let mut data = Vec::new();
        let mut rest = body;
        while rest.len() >= 12 {
            let len = u32::from_be_bytes(rest[..4].try_into()?) as usize;
            let kind = &rest[4..8];
            let chunk = rest.get(8..8 + len).context("truncated chunk")?;
            match kind {
                b"IHDR" => {
                    width = u32::from_be_bytes(chunk[..4].try_into()?) as usize;
                    height = u32::from_be_bytes(chunk[4..8].try_into()?) as usize;
                    let (depth, colour, interlace) = (chunk[8], chunk[9], chunk[12]);
                    channels = match colour {
                        2 => 3,
                        6 => 4,
                        other => bail!("colour type {other} is not RGB(A)"),
                    };
                    if depth != 8 || interlace != 0 {
                        bail!(
                            "bit depth {depth}, interlace {interlace}: not 8-bit, not interlaced"
                        );
                    }
                }
                b"IDAT" => data.extend_from_slice(chunk),
                b"IEND" => break,
                _ => {}
            }
            rest = &rest[12 + len..];
        }
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&data[..]).read_to_end(&mut raw)?;
        let stride = width * channels;
        if raw.len() != height * (stride + 1) {
            bail!("{} bytes of pixels for {width}x{height}", raw.len());
        }
        let mut image = vec![0u8; height * stride];
        for y in 0..height {
            let line = &raw[y * (stride + 1)..(y + 1) * (stride + 1)];
            let (filter, line) = (line[0], &line[1..]);
            let (done, row) = image.split_at_mut(y * stride);
            let above = if y == 0 {
                None
            } else {
                Some(&done[(y - 1) * stride..])
            };
            let row = &mut row[..stride];
            for x in 0..stride {
                let a = if x >= channels { row[x - channels] } else { 0 };
                let b = above.map_or(0, |r| r[x]);
                let c = match above {
                    Some(r) if x >= channels => r[x - channels],
                    _ => 0,
                };
                let predicted = match filter {
                    0 => 0,
                    1 => a,
                    2 => b,
                    3 => ((a as u16 + b as u16) / 2) as u8,
                    4 => paeth(a, b, c),
                    other => bail!("unknown PNG filter {other}"),
                };
                row[x] = line[x].wrapping_add(predicted);
            }
        }
        let pixels = image
            .chunks_exact(channels)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        Ok(Screenshot {
            width,
            height,
            pixels,
            file: PathBuf::new(),
        })
    }
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = a as i16 + b as i16 - c as i16;
    let (pa, pb, pc) = (
        (p - a as i16).abs(),
        (p - b as i16).abs(),
        (p - c as i16).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}
