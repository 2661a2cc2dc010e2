//! A headless Chromium a test can use as a person would: load a page, type into a field, click
//! with the mouse, and read what the page shows. Driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands on the browser's fd 3, answers on its fd 4, each a JSON
//! object ended by a NUL byte), so no port and no WebSocket are needed.

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
