//! Shared steps on releases: fetching an archive from the incoming store (hashing as it goes)
//! and keeping the release records that `fleetcast releases` and the tracker read.

use std::path::Path;

use async_nats::jetstream::object_store::GetErrorKind;
use fleetcast_events::Encoding;
use fleetcast_events::names::release_key;
use fleetcast_events::v1::{Rejection, ReleaseRecord, ReleaseState};
use semver::Version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bus::Bus;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("archive {0} is not in the incoming store")]
    NotFound(String),
    #[error("cannot fetch archive {object}: {reason}")]
    Transient { object: String, reason: String },
}

/// An archive copied to a local temporary file (removed on drop), with its size and BLAKE3.
pub struct FetchedArchive {
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub blake3: String,
}

/// Object-store chunk size for archives: larger than the 128 KiB default, so a fetch is fewer,
/// bigger messages (well under the 1 MB default `max_payload` of a NATS server).
const ARCHIVE_CHUNK_SIZE: usize = 512 * 1024;

impl Bus {
    /// Uploads an archive to the incoming store as `object`.
    pub async fn upload_archive(
        &self,
        object: &str,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<(), String> {
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: object.into(),
            chunk_size: Some(ARCHIVE_CHUNK_SIZE),
            ..Default::default()
        };
        self.incoming
            .put(meta, data)
            .await
            .map(|_| ())
            .map_err(|e| format!("uploading {object}: {e}"))
    }

    pub async fn fetch_archive(
        &self,
        object: &str,
        work_dir: &Path,
    ) -> Result<FetchedArchive, FetchError> {
        let transient = |e: &dyn std::fmt::Display| FetchError::Transient {
            object: object.into(),
            reason: e.to_string(),
        };
        let mut reader = match self.incoming.get(object).await {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), GetErrorKind::NotFound) => {
                return Err(FetchError::NotFound(object.into()));
            }
            Err(e) => return Err(transient(&e)),
        };
        std::fs::create_dir_all(work_dir).map_err(|e| transient(&e))?;
        let file = tempfile::Builder::new()
            .prefix("archive-")
            .suffix(".zip")
            .tempfile_in(work_dir)
            .map_err(|e| transient(&e))?;
        let mut out = tokio::fs::File::from_std(file.reopen().map_err(|e| transient(&e))?);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buf).await.map_err(|e| transient(&e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).await.map_err(|e| transient(&e))?;
            size += n as u64;
        }
        out.flush().await.map_err(|e| transient(&e))?;
        Ok(FetchedArchive {
            file,
            size,
            blake3: hasher.finalize().to_hex().to_string(),
        })
    }

    pub async fn release_record(
        &self,
        app: &str,
        version: &Version,
    ) -> Result<Option<ReleaseRecord>, String> {
        let entry = self
            .releases
            .get(release_key(app, version))
            .await
            .map_err(|e| e.to_string())?;
        match entry {
            None => Ok(None),
            Some(bytes) => Encoding::Json
                .decode(&bytes)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }

    pub async fn put_release_record(&self, record: &ReleaseRecord) -> Result<(), String> {
        let bytes = Encoding::Json.encode(record).map_err(|e| e.to_string())?;
        self.releases
            .put(release_key(&record.app, &record.version), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Records a rejection, unless the same app+version already made it further: a refused
    /// re-publish of a good release must not hide the good one. `of_signed` is for the
    /// distributor, which refuses a release that is signed (and so replaces that state).
    pub async fn record_rejection(
        &self,
        app: &str,
        version: &Version,
        reason: &Rejection,
        of_signed: bool,
    ) -> Result<(), String> {
        if let Some(existing) = self.release_record(app, version).await? {
            let keep = match existing.state {
                ReleaseState::Stored => true,
                ReleaseState::Signed => !of_signed,
                ReleaseState::Rejected => false,
            };
            if keep {
                return Ok(());
            }
        }
        self.put_release_record(&ReleaseRecord {
            app: app.into(),
            version: version.clone(),
            state: ReleaseState::Rejected,
            reason: Some(reason.clone()),
            manifest: None,
            stored: None,
            updated: time::OffsetDateTime::now_utc(),
        })
        .await
    }
}
