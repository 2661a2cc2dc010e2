//! Shared steps on releases: fetching an archive from the incoming store (hashing as it goes)
//! and keeping the release records that `fleetcast releases` and the tracker read.

use std::path::Path;

use async_nats::jetstream::object_store::GetErrorKind;
use fleetcast_events::names::{release_key, release_rejection_key};
use fleetcast_events::v1::{Rejection, ReleaseRecord, ReleaseState};
use fleetcast_events::{AppName, Encoding, RingName};
use futures::StreamExt;
use semver::Version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use async_nats::jetstream::{kv, object_store, stream};

use fleetcast_events::names::{DESIRED_BUCKET, INCOMING_BUCKET, RELEASES_BUCKET, RELEASES_STREAM};

use crate::bus::{Bus, BusError};

/// What every release-pipeline service (watcher, signer, distributor) uses of the bus: the
/// release events stream, the release records (its refusals), the incoming archives. A
/// service that binds more holds this as its `bus` (see [`crate::bus_role!`]).
#[derive(Clone)]
pub struct PipelineBus {
    bus: Bus,
    pub releases_stream: stream::Stream,
    pub records: Records,
    pub incoming: Incoming,
}

crate::bus_role!(PipelineBus);

impl crate::bus::Role for PipelineBus {
    async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(PipelineBus {
            releases_stream: bus.stream(RELEASES_STREAM).await?,
            records: Records::bind(bus).await?,
            incoming: Incoming::bind(bus).await?,
            bus: bus.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("archive {0} is not in the incoming store")]
    NotFound(String),
    /// The stored archive is not the one the event names.
    #[error("archive {object} has {got}; the event says {want}")]
    Mismatch {
        object: String,
        got: String,
        want: String,
    },
    /// Larger than any archive the limits accept: refused before a byte is written.
    #[error("archive {object} is {size} bytes, more than the {limit} bytes an archive may have")]
    TooLarge {
        object: String,
        size: u64,
        limit: u64,
    },
    /// The local disk is full (or over quota): not retried, since a retry would only fill it
    /// again while the message holds the queue.
    #[error("no room for archive {object} in {dir}: {reason}")]
    DiskFull {
        object: String,
        dir: String,
        reason: String,
    },
    #[error("cannot fetch archive {object}: {reason}")]
    Transient { object: String, reason: String },
}

impl FetchError {
    /// The rejection to report for a missing, different, too large archive or a full disk;
    /// `None` when worth retrying.
    pub fn rejection(&self) -> Option<Rejection> {
        use fleetcast_events::v1::RejectCode;
        let code = match self {
            FetchError::NotFound(_) | FetchError::Mismatch { .. } => RejectCode::ArchiveMismatch,
            FetchError::TooLarge { .. } => RejectCode::TooLarge,
            FetchError::DiskFull { .. } => RejectCode::DiskFull,
            FetchError::Transient { .. } => return None,
        };
        Some(Rejection {
            code,
            message: self.to_string(),
        })
    }
}

/// What went wrong reading or writing a release record or a desired state.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The bucket could not be read or written (NATS unavailable, a timeout): worth retrying.
    #[error("{bucket} {key}: {reason}")]
    Store {
        bucket: &'static str,
        key: String,
        reason: String,
    },
    /// A stored value that does not decode: a retry reads the same bytes.
    #[error("{bucket} {key}: unreadable: {reason}")]
    Corrupt {
        bucket: &'static str,
        key: String,
        reason: String,
    },
    /// What was asked cannot be done: a bad ring name, a version that is not stored.
    #[error("{0}")]
    Refused(String),
}

impl RecordError {
    /// Whether the same request may succeed later: NATS back, the store reachable again.
    pub fn is_transient(&self) -> bool {
        matches!(self, RecordError::Store { .. })
    }

    fn store(bucket: &'static str, key: &str, reason: impl std::fmt::Display) -> RecordError {
        RecordError::Store {
            bucket,
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    fn corrupt(bucket: &'static str, key: &str, reason: impl std::fmt::Display) -> RecordError {
        RecordError::Corrupt {
            bucket,
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }
}

const RELEASES: &str = "releases";
const DESIRED: &str = "desired state";

/// Whether a local write failed for want of room: a full disk or an exhausted quota.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// An archive copied to a local temporary file (removed on drop), with its size and BLAKE3.
pub struct FetchedArchive {
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub blake3: String,
}

/// The checks made on an object's stored size before it is downloaded: not over `max_size`,
/// and the size the event announced, if any.
fn check_size(
    object: &str,
    stored: u64,
    announced: Option<u64>,
    max_size: u64,
    blake3: &str,
) -> Result<(), FetchError> {
    if stored > max_size {
        return Err(FetchError::TooLarge {
            object: object.into(),
            size: stored,
            limit: max_size,
        });
    }
    if let Some(want) = announced.filter(|want| *want != stored) {
        return Err(FetchError::Mismatch {
            object: object.into(),
            got: format!("{stored} bytes"),
            want: format!("{want} bytes, BLAKE3 {blake3}"),
        });
    }
    Ok(())
}

/// The waits before "not found" is believed. The event naming an object is published after
/// the object was stored, but in a cluster the lookup may be answered by a replica that has
/// not applied it yet (direct gets are served by any replica), and a release must not be
/// rejected for that.
const NOT_FOUND_PATIENCE: [std::time::Duration; 4] = [
    std::time::Duration::from_millis(250),
    std::time::Duration::from_millis(500),
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(2),
];

/// Object-store chunk size for archives: larger than the 128 KiB default, so a fetch is fewer,
/// bigger messages (well under the 1 MB default `max_payload` of a NATS server).
const ARCHIVE_CHUNK_SIZE: usize = 512 * 1024;

/// The incoming object store: archives waiting to be signed and chunked.
#[derive(Clone)]
pub struct Incoming(object_store::ObjectStore);

impl Incoming {
    /// The incoming object store a service created.
    pub async fn bind(bus: &Bus) -> Result<Self, BusError> {
        let store = bus
            .js
            .get_object_store(INCOMING_BUCKET)
            .await
            .map_err(|e| crate::bus::not_set_up(INCOMING_BUCKET, &e))?;
        Ok(Incoming(store))
    }

    /// The object store itself (listing, metadata).
    pub fn store(&self) -> &object_store::ObjectStore {
        &self.0
    }

    /// Removes `object` (an archive whose release is stored or refused).
    pub async fn delete(&self, object: &str) -> Result<(), object_store::DeleteError> {
        self.0.delete(object).await
    }

    /// Uploads an archive to the incoming store as `object`.
    pub async fn upload_archive(
        &self,
        object: &str,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<(), UploadError> {
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: object.into(),
            chunk_size: Some(ARCHIVE_CHUNK_SIZE),
            ..Default::default()
        };
        match self.0.put(meta, data).await {
            Ok(_) => Ok(()),
            Err(source) => Err(UploadError {
                object: object.into(),
                source,
            }),
        }
    }

    /// Copies `object` to a temporary file, hashing it on the way, and checks that it is the
    /// archive the event announced: its BLAKE3, and its size when the event gives one. An
    /// object whose stored size is over `max_size` (or not the event's) is refused before
    /// anything is written; a full disk is a [`FetchError::DiskFull`].
    pub async fn fetch_archive(
        &self,
        object: &str,
        blake3: &str,
        size: Option<u64>,
        max_size: u64,
        work_dir: &Path,
    ) -> Result<FetchedArchive, FetchError> {
        let transient = |e: &dyn std::fmt::Display| FetchError::Transient {
            object: object.into(),
            reason: e.to_string(),
        };
        // A local write error: a full disk is final, anything else worth another try.
        let local = |e: std::io::Error| {
            if is_disk_full(&e) {
                FetchError::DiskFull {
                    object: object.into(),
                    dir: work_dir.display().to_string(),
                    reason: e.to_string(),
                }
            } else {
                transient(&e)
            }
        };
        let mut reader = self.open_patiently(object).await?;
        // The stored size, from the object's info, before a byte is written: an archive over
        // the limits would be refused after filling the disk otherwise.
        let stored = reader.info.size as u64;
        check_size(object, stored, size, max_size, blake3)?;
        std::fs::create_dir_all(work_dir).map_err(local)?;
        let file = tempfile::Builder::new()
            .prefix("archive-")
            .suffix(".zip")
            .tempfile_in(work_dir)
            .map_err(local)?;
        let mut out = tokio::fs::File::from_std(file.reopen().map_err(local)?);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut read = 0u64;
        loop {
            let n = reader.read(&mut buf).await.map_err(|e| transient(&e))?;
            if n == 0 {
                break;
            }
            read += n as u64;
            // The object's chunks are not bounded by its info: stop at the size it gave.
            if read > stored {
                return Err(FetchError::Mismatch {
                    object: object.into(),
                    got: format!("more than the {stored} bytes its info gives"),
                    want: format!("{stored} bytes"),
                });
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).await.map_err(local)?;
        }
        out.flush().await.map_err(local)?;
        let got = hasher.finalize().to_hex().to_string();
        if got != blake3 || size.is_some_and(|want| want != read) {
            let want_size = size.map_or(String::new(), |s| format!("{s} bytes, "));
            return Err(FetchError::Mismatch {
                object: object.into(),
                got: format!("{read} bytes, BLAKE3 {got}"),
                want: format!("{want_size}BLAKE3 {blake3}"),
            });
        }
        Ok(FetchedArchive {
            file,
            size: read,
            blake3: got,
        })
    }

    /// `object`, waiting a little before believing it is not there (see
    /// [`NOT_FOUND_PATIENCE`]).
    async fn open_patiently(&self, object: &str) -> Result<object_store::Object, FetchError> {
        let mut patience = NOT_FOUND_PATIENCE.iter();
        loop {
            match self.0.get(object).await {
                Ok(reader) => return Ok(reader),
                Err(e) if matches!(e.kind(), GetErrorKind::NotFound) => match patience.next() {
                    Some(wait) => tokio::time::sleep(*wait).await,
                    None => return Err(FetchError::NotFound(object.into())),
                },
                Err(e) => {
                    return Err(FetchError::Transient {
                        object: object.into(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}

/// The release records: what became of each published archive, which `fleetcast releases`,
/// the tracker and each stage read.
#[derive(Clone)]
pub struct Records(kv::Store);

impl Records {
    /// The release records' bucket a service created.
    pub async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(Records(bus.bucket(RELEASES_BUCKET).await?))
    }

    pub async fn release_record(
        &self,
        app: &str,
        version: &Version,
    ) -> Result<Option<ReleaseRecord>, RecordError> {
        let key = release_key(app, version);
        let entry = (self.0.get(&key).await).map_err(|e| RecordError::store(RELEASES, &key, e))?;
        match entry {
            None => Ok(None),
            Some(bytes) => Encoding::Json
                .decode(&bytes)
                .map(Some)
                .map_err(|e| RecordError::corrupt(RELEASES, &key, e)),
        }
    }

    /// The signed manifest of a stored release: what a desired state may name.
    pub async fn stored_manifest(
        &self,
        app: &AppName,
        version: &Version,
    ) -> Result<fleetcast_events::SignedManifest, RecordError> {
        let record = self.release_record(app, version).await?.ok_or_else(|| {
            RecordError::Refused(format!("{app} {version} is not a known release"))
        })?;
        let (ReleaseState::Stored, Some(manifest)) = (record.state, record.manifest) else {
            return Err(RecordError::Refused(format!(
                "{app} {version} is not stored (state {:?})",
                record.state
            )));
        };
        Ok(manifest)
    }

    pub async fn put_release_record(&self, record: &ReleaseRecord) -> Result<(), RecordError> {
        self.put_release_record_at(&release_key(&record.app, &record.version), record)
            .await
    }

    /// Records a rejection of the archive `blake3` (when known) of app+version: always under
    /// that archive's own key ([`release_rejection_key`]), where its publisher looks; and as
    /// the version's record too, unless the same app+version already made it further: a
    /// refused re-publish of a good release must not hide the good one. `of_signed` is for the
    /// distributor, which refuses a release that is signed (and so replaces that state).
    pub async fn record_rejection(
        &self,
        app: &AppName,
        version: &Version,
        blake3: Option<&str>,
        reason: &Rejection,
        of_signed: bool,
    ) -> Result<(), RecordError> {
        let record = ReleaseRecord {
            app: app.clone(),
            version: version.clone(),
            state: ReleaseState::Rejected,
            blake3: blake3.map(String::from),
            reason: Some(reason.clone()),
            manifest: None,
            stored: None,
            updated: time::OffsetDateTime::now_utc(),
        };
        if let Some(blake3) = blake3 {
            self.put_release_record_at(&release_rejection_key(app, version, blake3), &record)
                .await?;
        }
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
        self.put_release_record(&record).await
    }

    /// Every release record (of `app` only, when given), newest version first within each
    /// app; a rejection kept both under its archive's key and as the version's record is
    /// listed once. What `fleetcast releases` shows and a rollback chooses from.
    pub async fn release_records(
        &self,
        app: Option<&str>,
    ) -> Result<Vec<ReleaseRecord>, RecordError> {
        let listing = |e| RecordError::store(RELEASES, "(listing)", e);
        let mut keys = (self.0.keys().await).map_err(|e| listing(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| listing(e.to_string()))?;
            if app.is_some_and(|a| !key.starts_with(&format!("{a}."))) {
                continue;
            }
            let bytes =
                (self.0.get(&key).await).map_err(|e| RecordError::store(RELEASES, &key, e))?;
            if let Some(bytes) = bytes {
                match Encoding::Json.decode::<ReleaseRecord>(&bytes) {
                    Ok(record) => out.push(record),
                    Err(e) => tracing::warn!(%key, error = %e, "unreadable release record"),
                }
            }
        }
        out.sort_by(|a, b| {
            a.app
                .cmp(&b.app)
                .then(b.version.cmp(&a.version))
                .then(b.updated.cmp(&a.updated))
        });
        out.dedup_by(|later, earlier| {
            later.app == earlier.app
                && later.version == earlier.version
                && later.state == earlier.state
                && later.blake3 == earlier.blake3
        });
        Ok(out)
    }

    /// Asks the signer for a rollback of `app` (or one `ring`) to `to`, an earlier stored
    /// release, replacing every version up to the newest stored one; the signer issues the
    /// directive, the tracker rolls it out. Published on `user`'s own rollback subject (which
    /// says who asked: the CLI's NATS user, or `tracker` for the HTTP API), `requested_by` in
    /// the body for people reading it. Returns the newest version it replaces. The one place
    /// both `fleetcast rollback` and the tracker's `POST /api/apps/{app}/rollback` ask.
    pub async fn request_rollback(
        &self,
        bus: &Bus,
        app: &AppName,
        to: &Version,
        ring: Option<&RingName>,
        user: &str,
        requested_by: &str,
    ) -> Result<Version, RollbackError> {
        let stored: Vec<Version> = self
            .release_records(Some(app))
            .await
            .map_err(|e| RollbackError::Bus(e.to_string()))?
            .into_iter()
            .filter(|r| r.app == *app && r.state == ReleaseState::Stored)
            .map(|r| r.version)
            .collect();
        if !stored.contains(to) {
            return Err(RollbackError::Refused(format!(
                "{app} {to} is not a stored release"
            )));
        }
        let from = stored
            .into_iter()
            .max()
            .filter(|newest| newest > to)
            .ok_or_else(|| {
                RollbackError::Refused(format!(
                    "no stored release of {app} newer than {to} to roll back from"
                ))
            })?;
        let request = fleetcast_events::v1::RollbackRequested {
            app: app.clone(),
            to: to.clone(),
            from: from.clone(),
            ring: ring.cloned(),
            requested_by: requested_by.into(),
        };
        let msg_id = format!(
            "rollback-requested.{app}.{to}.{from}.{}",
            ring.map_or("all", |r| r.as_str())
        );
        bus.publish_event(
            &fleetcast_events::names::rollback_requested_subject(user),
            &request,
            Encoding::Json,
            Some(&msg_id),
        )
        .await
        .map_err(|e| RollbackError::Bus(format!("publishing the rollback request: {e}")))?;
        Ok(from)
    }

    async fn put_release_record_at(
        &self,
        key: &str,
        record: &ReleaseRecord,
    ) -> Result<(), RecordError> {
        let bytes = Encoding::Json
            .encode(record)
            .map_err(|e| RecordError::corrupt(RELEASES, key, e))?;
        (self.0.put(key, bytes.into()).await)
            .map(|_| ())
            .map_err(|e| RecordError::store(RELEASES, key, e))
    }

    /// What became of the archive `blake3` published as app+version, judging only records
    /// written after `since` (KV revisions read before it was published, see
    /// [`Records::release_revisions`]) for a rejection, so an earlier refusal of the same bytes is
    /// not taken for this attempt's: `Some` once it is stored (at any time: stored is stored)
    /// or rejected; `None` while undecided.
    pub async fn archive_outcome(
        &self,
        app: &str,
        version: &Version,
        blake3: &str,
        since: ReleaseRevisions,
    ) -> Result<Option<ReleaseRecord>, RecordError> {
        let version_entry = self.release_entry(&release_key(app, version)).await?;
        if let Some((_, record)) = &version_entry
            && record.blake3.as_deref() == Some(blake3)
            && record.state == ReleaseState::Stored
        {
            return Ok(version_entry.map(|(_, r)| r));
        }
        let own = self
            .release_entry(&release_rejection_key(app, version, blake3))
            .await?;
        if let Some((revision, record)) = own
            && revision > since.archive
            && record.state == ReleaseState::Rejected
        {
            return Ok(Some(record));
        }
        match version_entry {
            Some((revision, record))
                if revision > since.version
                    && record.state == ReleaseState::Rejected
                    && record.blake3.as_deref() == Some(blake3) =>
            {
                Ok(Some(record))
            }
            _ => Ok(None),
        }
    }

    /// The current revisions of the records [`Records::archive_outcome`] reads (0: none yet).
    pub async fn release_revisions(
        &self,
        app: &str,
        version: &Version,
        blake3: &str,
    ) -> Result<ReleaseRevisions, RecordError> {
        let revision = |entry: Option<(u64, ReleaseRecord)>| entry.map_or(0, |(r, _)| r);
        Ok(ReleaseRevisions {
            version: revision(self.release_entry(&release_key(app, version)).await?),
            archive: revision(
                self.release_entry(&release_rejection_key(app, version, blake3))
                    .await?,
            ),
        })
    }

    async fn release_entry(&self, key: &str) -> Result<Option<(u64, ReleaseRecord)>, RecordError> {
        let entry = (self.0.entry(key).await).map_err(|e| RecordError::store(RELEASES, key, e))?;
        match entry {
            Some(entry) if matches!(entry.operation, async_nats::jetstream::kv::Operation::Put) => {
                let record = Encoding::Json
                    .decode(&entry.value)
                    .map_err(|e| RecordError::corrupt(RELEASES, key, e))?;
                Ok(Some((entry.revision, record)))
            }
            _ => Ok(None),
        }
    }
}

/// The desired states: per app and ring, the version its agents install.
#[derive(Clone)]
pub struct Desired(kv::Store);

impl Desired {
    /// The desired states' bucket a service created.
    pub async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(Desired(bus.bucket(DESIRED_BUCKET).await?))
    }

    /// The bucket itself (reads, watches).
    pub fn store(&self) -> &kv::Store {
        &self.0
    }

    /// Writes the desired state of `app` in `ring`: the stored release's signed manifest,
    /// which agents watching that key verify and install; `slot` makes them ask the tracker
    /// for a rollout slot before switching.
    pub async fn desire(
        &self,
        records: &Records,
        app: &AppName,
        ring: &RingName,
        version: &Version,
        slot: bool,
    ) -> Result<(), RecordError> {
        let manifest = records.stored_manifest(app, version).await?;
        self.desire_with(app, ring, version, manifest, slot).await
    }

    /// As [`Desired::desire`], with the signed manifest given (a rollback directive).
    pub async fn desire_with(
        &self,
        app: &AppName,
        ring: &RingName,
        version: &Version,
        manifest: fleetcast_events::SignedManifest,
        slot: bool,
    ) -> Result<(), RecordError> {
        let desired = fleetcast_events::v1::DesiredState {
            app: app.clone(),
            ring: ring.clone(),
            version: version.clone(),
            manifest,
            slot,
        };
        let key = fleetcast_events::names::desired_key(app, ring);
        let bytes = Encoding::Json
            .encode(&desired)
            .map_err(|e| RecordError::corrupt(DESIRED, &key, e))?;
        (self.0.put(&key, bytes.into()).await).map_err(|e| RecordError::store(DESIRED, &key, e))?;
        Ok(())
    }
}

/// An archive that did not reach the incoming store (the store is full, or NATS unreachable).
#[derive(Debug, thiserror::Error)]
#[error("uploading {object}: {source}")]
pub struct UploadError {
    pub object: String,
    pub source: object_store::PutError,
}

/// Why a rollback was not asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollbackError {
    /// Not a rollback that can be made: `to` not stored, nothing newer, a bad name.
    #[error("{0}")]
    Refused(String),
    /// NATS did not answer: worth trying again.
    #[error("{0}")]
    Bus(String),
}

/// KV revisions of a version's record and of one archive's rejection record, taken before the
/// archive is published.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReleaseRevisions {
    pub version: u64,
    pub archive: u64,
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use fleetcast_events::v1::RejectCode;

    use super::*;

    #[test]
    fn an_object_over_the_limit_or_not_the_announced_size_is_refused_before_download() {
        let blake3 = "ab".repeat(32);
        assert!(check_size("a.zip", 1000, Some(1000), 1000, &blake3).is_ok());
        assert!(check_size("a.zip", 1000, None, 1000, &blake3).is_ok());
        let over = check_size("a.zip", 1001, None, 1000, &blake3).expect_err("over the limit");
        assert!(
            matches!(
                over,
                FetchError::TooLarge {
                    size: 1001,
                    limit: 1000,
                    ..
                }
            ),
            "{over}"
        );
        assert_eq!(
            over.rejection().map(|r| r.code),
            Some(RejectCode::TooLarge),
            "a final refusal, not a retry"
        );
        // Over the limit even when the event announces that size.
        assert!(matches!(
            check_size("a.zip", 5000, Some(5000), 1000, &blake3),
            Err(FetchError::TooLarge { .. })
        ));
        let other = check_size("a.zip", 900, Some(1000), 1000, &blake3).expect_err("other size");
        assert_eq!(
            other.rejection().map(|r| r.code),
            Some(RejectCode::ArchiveMismatch)
        );
    }

    /// What callers retry: a store that could not be reached; never bytes that do not decode
    /// (a retry reads the same) nor a request that cannot be done.
    #[test]
    fn only_an_unreachable_store_is_worth_retrying() {
        let store = RecordError::store(RELEASES, "web.1_0_0", "timed out");
        assert!(store.is_transient());
        assert_eq!(store.to_string(), "releases web.1_0_0: timed out");
        let corrupt = RecordError::corrupt(RELEASES, "web.1_0_0", "expected value");
        assert!(!corrupt.is_transient());
        assert!(corrupt.to_string().contains("unreadable"), "{corrupt}");
        assert!(!RecordError::Refused("web 1.0.0 is not stored".into()).is_transient());
    }

    #[test]
    fn a_full_disk_is_a_final_refusal_other_write_errors_are_retried() {
        // A real write to a device that is always full.
        let mut full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let e = full.write_all(&[0u8; 4096]).and_then(|()| full.flush());
        let e = e.expect_err("/dev/full took the write");
        assert!(is_disk_full(&e), "{e:?}");
        const EDQUOT: i32 = 122;
        assert!(is_disk_full(&std::io::Error::from_raw_os_error(EDQUOT)));
        const EACCES: i32 = 13;
        assert!(!is_disk_full(&std::io::Error::from_raw_os_error(EACCES)));

        let full = FetchError::DiskFull {
            object: "a.zip".into(),
            dir: "/work".into(),
            reason: e.to_string(),
        };
        assert_eq!(full.rejection().map(|r| r.code), Some(RejectCode::DiskFull));
        let transient = FetchError::Transient {
            object: "a.zip".into(),
            reason: "permission denied".into(),
        };
        assert!(transient.rejection().is_none());
    }
}
