//! Media on S3-compatible object storage (`--storage s3://bucket/prefix`), through the
//! `object_store` crate. The names are the layout's ([`super::layout::keys`]); this module moves
//! bytes: files are put from local temporary files (multipart past one part's size), stems are
//! read through the bounded local cache, and nothing is visible until it is whole, since an S3
//! put or a completed multipart upload appears at once or not at all.
//!
//! A job's outputs are written per run (`attempt-N/`). None of them is served until the job's
//! final update says `complete`; the run that wrote it is then the job's last run, so the
//! published result is the highest attempt that has one. A stale node, whose lease was taken over,
//! only ever writes a lower attempt, which can never be the one served.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::buffered::BufWriter;
use object_store::path::Path as Location;
use object_store::signer::Signer;
use object_store::{ClientConfigKey, GetOptions, GetRange, ObjectMeta, ObjectStore, PutPayload, RetryConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cache::{CachedFile, StemCache};
use super::layout::keys;
use super::model::{JobId, ProjectId};

/// Parts of a multipart upload, and the size past which a put becomes one.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// A request that fails on the network or with a 5xx is tried again, for at most this long in
/// all: an upload then fails with 503 instead of holding the client for minutes.
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("no such object")]
    NotFound,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The storage did not answer, or refused: the cause may name the endpoint, so it is logged
    /// and never sent to a client.
    #[error("object storage: {0}")]
    Unavailable(String),
}

impl From<object_store::Error> for MediaError {
    fn from(err: object_store::Error) -> Self {
        match err {
            object_store::Error::NotFound { .. } => MediaError::NotFound,
            other => MediaError::Unavailable(other.to_string()),
        }
    }
}

/// `s3://bucket/prefix`, as given to `--storage`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageUrl {
    pub bucket: String,
    /// Without slashes at either end; empty for the bucket's root.
    pub prefix: String,
}

impl StorageUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text.strip_prefix("s3://").ok_or("expected s3://bucket/prefix: object storage is S3-compatible; local storage is the default (--data-dir)")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err("the URL names no bucket: s3://bucket/prefix".into());
        }
        Ok(Self { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() })
    }
}

impl std::fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// A key under the storage's prefix.
#[derive(Debug, Clone)]
pub struct ObjectKey(Location);

impl ObjectKey {
    pub fn new(prefix: &str, relative: &str) -> Self {
        Self(Location::from(format!("{prefix}/{relative}").as_str()))
    }

    pub fn location(&self) -> &Location {
        &self.0
    }

    pub fn file_name(&self) -> &str {
        self.0.filename().unwrap_or_default()
    }
}

/// An object's size and time, as `/media` needs them.
#[derive(Debug, Clone, Copy)]
pub struct ObjectInfo {
    pub bytes: u64,
    pub modified_nanos: u128,
}

/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct ObjectMedia {
    store: Arc<AmazonS3>,
    url: Arc<StorageUrl>,
    cache: Arc<StemCache>,
}

impl ObjectMedia {
    /// Connects with the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, ...) and checks that the
    /// bucket answers and lets us in: a server that cannot store anything must not start.
    pub async fn connect(url: StorageUrl, cache: Arc<StemCache>) -> Result<Self, MediaError> {
        let retry = RetryConfig { retry_timeout: RETRY_TIMEOUT, max_retries: 4, ..RetryConfig::default() };
        // Set key by key: client options as a whole would replace those the environment gave
        // (AWS_ALLOW_HTTP among them).
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_retry(retry)
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), "5s")
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "120s")
            .build()
            .map_err(|err| MediaError::Unavailable(err.to_string()))?;
        let media = Self { store: Arc::new(store), url: Arc::new(url), cache };
        media.ping().await?;
        Ok(media)
    }

    pub fn url(&self) -> &StorageUrl {
        &self.url
    }

    pub fn cache(&self) -> &Arc<StemCache> {
        &self.cache
    }

    pub fn key(&self, relative: &str) -> ObjectKey {
        ObjectKey::new(&self.url.prefix, relative)
    }

    /// The key relative to the prefix, as the layout names it.
    fn relative<'a>(&self, location: &'a Location) -> &'a str {
        let key = location.as_ref();
        if self.url.prefix.is_empty() {
            key
        } else {
            key.strip_prefix(self.url.prefix.as_str()).and_then(|rest| rest.strip_prefix('/')).unwrap_or(key)
        }
    }

    /// Whether the bucket answers and lets us in: a listing under a name nobody writes. (Not a
    /// HEAD: its 404 has no body, so a missing bucket would look like a missing key.)
    pub async fn ping(&self) -> Result<(), MediaError> {
        self.store.list_with_delimiter(Some(self.key(".mixd-ping").location())).await?;
        Ok(())
    }

    /// Puts a local file, streaming it (multipart past [`PART_BYTES`]). Nothing is visible unless
    /// it all arrives: a failed write aborts the upload; a failed completion leaves at most parts
    /// of an unfinished multipart upload, which S3 never shows (a bucket lifecycle rule for
    /// incomplete multipart uploads removes them).
    pub async fn put_file(&self, file: &Path, key: &ObjectKey) -> Result<(), MediaError> {
        let mut source = tokio::fs::File::open(file).await?;
        let mut writer = BufWriter::with_capacity(self.store.clone(), key.location().clone(), PART_BYTES);
        let written = async {
            let mut buffer = vec![0u8; 1024 * 1024];
            loop {
                let read = source.read(&mut buffer).await?;
                if read == 0 {
                    return Ok(());
                }
                writer.write_all(&buffer[..read]).await?;
            }
        };
        let outcome = match written.await {
            // The writer may be aborted only before it is shut down (it panics after).
            Err(err) => {
                let _ = writer.abort().await;
                Err(err)
            }
            Ok(()) => writer.shutdown().await,
        };
        // The crate reports its own failures through io::Error; those are the storage's.
        outcome.map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::StorageFull => MediaError::Io(err),
            _ => MediaError::Unavailable(err.to_string()),
        })
    }

    pub async fn put_bytes(&self, key: &ObjectKey, bytes: Vec<u8>) -> Result<(), MediaError> {
        self.store.put(key.location(), PutPayload::from(bytes)).await?;
        Ok(())
    }

    pub async fn get_bytes(&self, key: &ObjectKey) -> Result<Bytes, MediaError> {
        Ok(self.store.get(key.location()).await?.bytes().await?)
    }

    /// Deletes an object; one already gone is not an error.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), MediaError> {
        match self.store.delete(key.location()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Every object under `relative_prefix`, with keys relative to the storage's prefix.
    pub fn list<'a>(&'a self, relative_prefix: &str) -> BoxStream<'a, Result<(String, ObjectMeta), MediaError>> {
        let prefix = self.key(relative_prefix);
        self.store.list(Some(prefix.location())).map(move |meta| meta.map(|meta| (self.relative(&meta.location).to_string(), meta)).map_err(MediaError::from)).boxed()
    }

    /// The projects that have anything stored.
    pub async fn projects(&self) -> Result<Vec<ProjectId>, MediaError> {
        let listing = self.store.list_with_delimiter(Some(self.key("").location())).await?;
        Ok(listing.common_prefixes.iter().filter_map(|prefix| keys::project(self.relative(prefix))).collect())
    }

    pub async fn info(&self, key: &ObjectKey) -> Result<ObjectInfo, MediaError> {
        let meta = self.store.head(key.location()).await?;
        let modified_nanos = meta.last_modified.timestamp_nanos_opt().unwrap_or_default().max(0) as u128;
        Ok(ObjectInfo { bytes: meta.size, modified_nanos })
    }

    /// `range` of an object's bytes, as they arrive.
    pub async fn read(&self, key: &ObjectKey, range: Range<u64>) -> Result<BoxStream<'static, Result<Bytes, MediaError>>, MediaError> {
        let options = GetOptions { range: Some(GetRange::Bounded(range)), ..GetOptions::default() };
        let body = self.store.get_opts(key.location(), options).await?.into_stream();
        Ok(body.map_err(MediaError::from).boxed())
    }

    /// A URL that lets whoever has it read the object for `expires_in`, signed with our credentials.
    pub async fn presigned_url(&self, key: &ObjectKey, expires_in: Duration) -> Result<url::Url, MediaError> {
        Ok(self.store.signed_url(reqwest::Method::GET, key.location(), expires_in).await?)
    }

    /// The stem at `relative` key, from the local cache or fetched into it.
    pub async fn fetch_stem(&self, relative: &str) -> Result<CachedFile, MediaError> {
        self.cache.fetch(self.store.as_ref(), &self.key(relative)).await
    }

    /// Keeps a just-uploaded stem's file in the cache: the first mix of it then needs no download.
    pub async fn keep_in_cache(&self, file: &Path, relative: &str) {
        let name = self.key(relative).file_name().to_string();
        if let Err(err) = self.cache.adopt(file, name).await {
            tracing::debug!(%err, "could not keep an upload in the stem cache");
        }
    }

    /// Deletes a stem's audio, and this node's cached copy.
    pub async fn delete_stem_audio(&self, relative: &str) -> Result<(), MediaError> {
        let key = self.key(relative);
        self.cache.forget(key.file_name());
        self.delete(&key).await
    }

    /// The attempt whose outputs a complete job publishes: the highest one with a result.
    pub async fn published_attempt(&self, project: &ProjectId, job_id: JobId) -> Result<Option<u32>, MediaError> {
        let outputs: Vec<(String, ObjectMeta)> = self.list(&keys::job_outputs(project, job_id)).try_collect().await?;
        Ok(outputs.iter().filter_map(|(key, _)| keys::output_attempt(key)).filter(|(.., analysis)| !analysis).map(|(_, _, attempt, _)| attempt).max())
    }

    /// Deletes the outputs of every run of a job but `keep`'s (their nodes died, stalled or were
    /// canceled: never published). `keep: None` deletes them all.
    pub async fn delete_attempts_except(&self, project: &ProjectId, job_id: JobId, keep: Option<u32>) -> Result<(), MediaError> {
        let outputs: Vec<(String, ObjectMeta)> = self.list(&keys::job_outputs(project, job_id)).try_collect().await?;
        for (key, _) in outputs {
            if keys::output_attempt(&key).is_some_and(|(_, _, attempt, _)| Some(attempt) != keep) {
                self.delete(&self.key(&key)).await?;
            }
        }
        Ok(())
    }
}

/// An audio object without a record this old is left by a stem whose deletion did not finish (or
/// an upload whose record was never written): younger ones may be uploads in progress.
pub const ORPHAN_AGE: Duration = Duration::from_secs(3600);

impl ObjectMedia {
    /// One pass over the bucket: deletes the outputs of jobs older than `retention` and stems'
    /// audio left without a record, which is how a failed delete is retried, never forgotten.
    /// Returns how long until the next pass is due.
    pub async fn sweep(&self, retention: Duration) -> Result<Duration, MediaError> {
        use std::collections::{HashMap, HashSet};
        let now = chrono::Utc::now();
        let age = |meta: &ObjectMeta| (now - meta.last_modified).to_std().unwrap_or_default();
        let mut newest_output: HashMap<String, Duration> = HashMap::new();
        let mut records = HashSet::new();
        let mut audio = Vec::new();
        let mut listing = self.list("");
        while let Some((key, meta)) = listing.try_next().await? {
            if let Some((project, job_id, ..)) = keys::output_attempt(&key) {
                let outputs = newest_output.entry(keys::job_outputs(&project, job_id)).or_insert(Duration::MAX);
                *outputs = (*outputs).min(age(&meta));
            } else if let Some((_, stem_id, is_record)) = keys::stem(&key) {
                if is_record {
                    records.insert(stem_id);
                } else {
                    audio.push((key, stem_id, age(&meta)));
                }
            }
        }
        drop(listing);
        let mut next_due = ORPHAN_AGE.min(retention);
        for (outputs, youngest) in newest_output {
            if youngest >= retention {
                let keys: Vec<(String, ObjectMeta)> = self.list(&outputs).try_collect().await?;
                for (key, _) in keys {
                    self.delete(&self.key(&key)).await?;
                }
                tracing::info!(outputs, "removed an output past its retention");
            } else {
                next_due = next_due.min(retention - youngest);
            }
        }
        for (key, stem_id, age) in audio {
            if records.contains(&stem_id) {
                continue;
            }
            if age >= ORPHAN_AGE {
                self.delete(&self.key(&key)).await?;
                tracing::info!(key, "removed a stem's audio left without its record");
            } else {
                next_due = next_due.min(ORPHAN_AGE - age);
            }
        }
        Ok(next_due)
    }
}
