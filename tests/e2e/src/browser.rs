//! A headless Chromium a test can use as a person would: load a page, type into a field, click
//! with the mouse, and read what the page shows. Driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands on the browser's fd 3, answers on its fd 4, each a JSON
//! object ended by a NUL byte), so no port and no WebSocket are needed.
//!
//! For a page only looked at, one Chromium run does: [`page_dom`] and [`page_screenshot`]
//! load a tracker page, let its scripts run against the live API, and return the DOM it ends
//! with or a screenshot of it (decoded here, so a test can count the pixels of a colour: a
//! banner, a halt mark). [`Browser`] is for a page a test acts on.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::TIMEOUT;

pub struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: BufReader<ChildStdout>,
    next_id: u64,
    /// The page's session (its target, attached in flat mode).
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Browser {
    /// Starts Chromium (`FLEETCAST_CHROMIUM`, else `chromium`) with a fresh profile and opens
    /// `url` in a new page, waiting until it has loaded.
    pub async fn open(url: &str) -> anyhow::Result<Browser> {
        let chromium = std::env::var("FLEETCAST_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir()?;
        // The pipe is the browser's fds 3 (commands in) and 4 (answers out): the shell hands
        // it our stdin and stdout there.
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {chromium} (apt-get install chromium)"))?;
        let commands = child.stdin.take().context("chromium's command pipe")?;
        let answers = BufReader::new(child.stdout.take().context("chromium's answer pipe")?);
        let mut browser = Browser {
            child,
            commands,
            answers,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = browser
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"]
            .as_str()
            .context("no target id")?
            .to_string();
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .context("no session id")?
            .to_string();
        browser.call("Page.navigate", json!({ "url": url })).await?;
        browser
            .wait_for("the page loaded", "document.readyState === 'complete'")
            .await?;
        Ok(browser)
    }

    /// Sends one DevTools command (to the page once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = Value::String(self.session.clone());
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.commands.write_all(&bytes).await?;
        self.commands.flush().await?;
        let answer = tokio::time::timeout(TIMEOUT, async {
            loop {
                let mut buf = Vec::new();
                if self.answers.read_until(0, &mut buf).await? == 0 {
                    bail!("chromium closed its pipe");
                }
                buf.pop();
                let answer: Value = serde_json::from_slice(&buf)?;
                // Events (no id) and other commands' answers are not this one.
                if answer["id"].as_u64() == Some(id) {
                    return Ok(answer);
                }
            }
        })
        .await
        .with_context(|| format!("no answer to {method}"))??;
        if let Some(error) = answer.get("error") {
            bail!("{method}: {error}");
        }
        Ok(answer["result"].clone())
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(thrown) = result.get("exceptionDetails") {
            bail!("{expression}: {thrown}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Waits until `expression` is truthy in the page, and returns its value; fails after
    /// [`TIMEOUT`], naming `what` it waited for.
    pub async fn wait_for(&mut self, what: &str, expression: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let value = self.eval(expression).await?;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("timed out waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the middle of the element `selector` selects with the mouse, as a person would:
    /// whatever is on top there gets the click (a disabled button gets none).
    pub async fn click(&mut self, selector: &str) -> anyhow::Result<()> {
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector:?}); if (!e) return null; \
                 e.scrollIntoView({{ block: 'center' }}); const r = e.getBoundingClientRect(); \
                 return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await?;
        let (Some(x), Some(y)) = (at[0].as_f64(), at[1].as_f64()) else {
            bail!("nothing on the page matches {selector}");
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await?;
        }
        Ok(())
    }

    /// Clicks into the field `selector` and types `text` there.
    pub async fn type_into(&mut self, selector: &str, text: &str) -> anyhow::Result<()> {
        self.click(selector).await?;
        self.call("Input.insertText", json!({ "text": text }))
            .await?;
        Ok(())
    }

    /// The page's DOM as it is now.
    pub async fn dom(&mut self) -> anyhow::Result<String> {
        let html = self.eval("document.documentElement.outerHTML").await?;
        Ok(html.as_str().unwrap_or_default().to_string())
    }
}

// One-shot loads: the DOM or a screenshot of a page.

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
