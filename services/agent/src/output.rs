//! Bounded reading of what apps, hooks and health commands write: an app printing one endless
//! line, or a hook pouring out output, must not grow the agent's memory. A line longer than
//! [`MAX_LINE`] is cut (with [`CUT_MARKER`]) and the rest of it skipped; a command's captured
//! output keeps its last [`MAX_CAPTURE`] bytes.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt};

/// The longest app output line forwarded to the log.
pub const MAX_LINE: usize = 16 * 1024;

/// Appended to a line that was cut.
pub const CUT_MARKER: &str = " [line cut at 16 KiB]";

/// What a hook or health command's output is kept to (its end: where the error is).
pub const MAX_CAPTURE: usize = 16 * 1024;

/// Writes one line of the app's output into the agent's log as the event's message, as it
/// is: the log's format escapes it once (JSON) or not at all (text). Never as a `?field`, whose
/// Debug quoting a JSON log would escape a second time (`\\\"`).
pub fn log_app_line(app: &str, stream: &'static str, text: &str, cut: bool) {
    let marker = if cut { CUT_MARKER } else { "" };
    tracing::info!(target: "app", %app, stream, "{text}{marker}");
}

/// Reads the next line (without its `\n`) into `line`, keeping at most `max` bytes of it and
/// skipping the rest. `None` at the end of the input; else whether the line was cut.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    line: &mut Vec<u8>,
) -> io::Result<Option<bool>> {
    line.clear();
    let mut read_any = false;
    let mut cut = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(read_any.then_some(cut));
        }
        read_any = true;
        let (content, used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], end + 1, true),
            None => (available, available.len(), false),
        };
        let room = max.saturating_sub(line.len());
        if content.len() > room {
            cut = true;
        }
        line.extend_from_slice(&content[..content.len().min(room)]);
        reader.consume(used);
        if done {
            return Ok(Some(cut));
        }
    }
}

/// Reads `pipe` to its end and returns its last `max` bytes, and whether anything before them
/// was dropped. Memory stays below twice `max` whatever the amount read.
pub async fn read_tail<R: AsyncRead + Unpin>(
    mut pipe: R,
    max: usize,
) -> io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut dropped = false;
    let mut block = vec![0u8; 8 * 1024];
    loop {
        let n = pipe.read(&mut block).await?;
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&block[..n]);
        if kept.len() > 2 * max {
            let excess = kept.len() - max;
            kept.drain(..excess);
            dropped = true;
        }
    }
    if kept.len() > max {
        let excess = kept.len() - max;
        kept.drain(..excess);
        dropped = true;
    }
    Ok((kept, dropped))
}

#[cfg(test)]
mod tests {
    use fleetcast_runtime::telemetry::{self, LogFormat};

    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<(String, bool)> {
        let mut reader = tokio::io::BufReader::with_capacity(4, input);
        let mut line = Vec::new();
        let mut out = Vec::new();
        while let Some(cut) = read_line_bounded(&mut reader, max, &mut line)
            .await
            .expect("read")
        {
            out.push((String::from_utf8_lossy(&line).into_owned(), cut));
        }
        out
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_of_them_skipped() {
        let s = |t: &str, cut| (t.to_string(), cut);
        assert_eq!(
            lines(b"short\n0123456789abcdef\nexactly10c\n\nlast", 10).await,
            vec![
                s("short", false),
                s("0123456789", true),
                s("exactly10c", false),
                s("", false),
                s("last", false),
            ]
        );
        assert_eq!(lines(b"", 10).await, vec![]);
        assert_eq!(lines(b"\n", 10).await, vec![s("", false)]);
        // A line of a megabyte costs at most `max` bytes of memory.
        let mut big = vec![b'x'; 1 << 20];
        big.extend_from_slice(b"\nafter\n");
        let got = lines(&big, MAX_LINE).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.len(), MAX_LINE);
        assert!(got[0].1);
        assert_eq!(got[1], s("after", false));
    }

    /// The agent's log as its programs write it, for one app line.
    fn logged(format: LogFormat, text: &str, cut: bool) -> String {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = telemetry::subscriber(
            telemetry::EnvFilter::new("info"),
            format,
            false,
            move || writer.clone(),
        );
        tracing::subscriber::with_default(subscriber, || log_app_line("demo", "stdout", text, cut));
        let bytes = buffer.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn app_lines_are_escaped_once_in_json_and_not_at_all_in_text() {
        use fleetcast_runtime::telemetry::LogFormat;
        for line in [
            r#"said "hi" to C:\temp\x and \"quoted\""#,
            r#"{"level":"info","msg":"an app's own \"JSON\" line"}"#,
            "tab\there, a lone \\ backslash",
        ] {
            let json = logged(LogFormat::Json, line, false);
            let event: serde_json::Value =
                serde_json::from_str(json.trim()).expect("one JSON line");
            // Decoding the log line once gives the app's line back, byte for byte.
            assert_eq!(event["fields"]["message"], line, "{json}");
            assert_eq!(event["fields"]["app"], "demo");
            assert_eq!(event["target"], "app");
            let text = logged(LogFormat::Text, line, false);
            assert!(text.contains(&format!(" app: {line} app=demo")), "{text}");
        }
        let event: serde_json::Value =
            serde_json::from_str(logged(LogFormat::Json, "cut \"here", true).trim())
                .expect("one JSON line");
        assert_eq!(
            event["fields"]["message"],
            format!("cut \"here{CUT_MARKER}")
        );
    }

    #[tokio::test]
    async fn captured_output_keeps_its_end() {
        let (kept, dropped) = read_tail(&b"short"[..], 10).await.expect("read");
        assert_eq!((kept.as_slice(), dropped), (&b"short"[..], false));
        let (kept, dropped) = read_tail(&b"0123456789"[..], 10).await.expect("read");
        assert_eq!((kept.as_slice(), dropped), (&b"0123456789"[..], false));
        let mut big: Vec<u8> = (0..(1 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
        big.extend_from_slice(b"THE END");
        let (kept, dropped) = read_tail(big.as_slice(), 100).await.expect("read");
        assert!(dropped);
        assert_eq!(kept.len(), 100);
        assert!(kept.ends_with(b"THE END"));
        assert_eq!(kept.as_slice(), &big[big.len() - 100..]);
    }
}
