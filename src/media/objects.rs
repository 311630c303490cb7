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

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
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
use super::error::MediaError;
use super::layout::{keys, JobFile};
use crate::ids::{JobId, ProjectId};

/// Parts of a multipart upload, and the size past which a put becomes one.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// A request that fails on the network or with a 5xx is tried again, for at most this long in
/// all: an upload then fails with 503 instead of holding the client for minutes.
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The attempt each complete job's outputs were found under.
    published: Arc<Mutex<HashMap<JobId, u32>>>,
}

/// Complete jobs whose published attempt is remembered at most.
const PUBLISHED_REMEMBERED: usize = 10_000;

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
        let media = Self { store: Arc::new(store), url: Arc::new(url), cache, published: Arc::default() };
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
        self.cache.fetch(self.store.as_ref(), self.key(relative).location()).await
    }

    /// Keeps a just-uploaded stem's file in the cache: the first mix of it then needs no download.
    pub async fn keep_in_cache(&self, file: &Path, relative: &str) {
        let name = self.key(relative).file_name().to_string();
        if let Err(err) = self.cache.adopt(file, name).await {
            tracing::debug!(%err, "could not keep an upload in the stem cache");
            let _ = tokio::fs::remove_file(file).await;
        }
    }

    /// Deletes a stem's audio, and this node's cached copy.
    pub async fn delete_stem_audio(&self, relative: &str) -> Result<(), MediaError> {
        let key = self.key(relative);
        self.cache.forget(key.file_name()).await;
        self.delete(&key).await
    }

    /// The attempt whose outputs a complete job publishes: the highest one with a result. Asked
    /// only once the job is complete, when it can no longer change, so it is remembered: a
    /// player's range requests then cost no listing each.
    pub async fn published_attempt(&self, project: &ProjectId, job_id: JobId) -> Result<Option<u32>, MediaError> {
        if let Some(attempt) = self.published.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&job_id) {
            return Ok(Some(*attempt));
        }
        let attempt = self.job_outputs(project, job_id).await?.into_iter().filter(|(_, _, file)| *file != JobFile::Analysis).map(|(_, attempt, _)| attempt).max();
        if let Some(attempt) = attempt {
            let mut published = self.published.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Bounded without bookkeeping: forgetting costs one listing per job asked again.
            if published.len() >= PUBLISHED_REMEMBERED {
                published.clear();
            }
            published.insert(job_id, attempt);
        }
        Ok(attempt)
    }

    /// Deletes the outputs of every run of a job but `keep`'s (their nodes died, stalled or were
    /// canceled: never published). `keep: None` deletes them all.
    pub async fn delete_attempts_except(&self, project: &ProjectId, job_id: JobId, keep: Option<u32>) -> Result<(), MediaError> {
        for (key, attempt, _) in self.job_outputs(project, job_id).await? {
            if Some(attempt) != keep {
                self.delete(&self.key(&key)).await?;
            }
        }
        Ok(())
    }

    /// Every output any run of a job stored: (key, attempt, which file).
    async fn job_outputs(&self, project: &ProjectId, job_id: JobId) -> Result<Vec<(String, u32, JobFile)>, MediaError> {
        self.list(&keys::job_outputs(project, job_id))
            .try_filter_map(|(key, _)| async move { Ok(keys::output_attempt(&key).map(|(_, _, attempt, file)| (key, attempt, file))) })
            .try_collect()
            .await
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
        let now = chrono::Utc::now();
        let listing: Vec<(String, Duration)> = self.list("").map_ok(|(key, meta)| (key, (now - meta.last_modified).to_std().unwrap_or_default())).try_collect().await?;
        let plan = plan_sweep(listing, retention);
        for key in &plan.delete {
            self.delete(&self.key(key)).await?;
            tracing::info!(key, "removed: past its retention, or a stem's audio without its record");
        }
        Ok(plan.next_due)
    }
}

#[derive(Debug, PartialEq)]
struct SweepPlan {
    delete: Vec<String>,
    next_due: Duration,
}

/// What one sweep deletes, from every key under the prefix with its age: every output of a job
/// whose youngest output is past `retention`, and audio without a record past [`ORPHAN_AGE`].
fn plan_sweep(listing: Vec<(String, Duration)>, retention: Duration) -> SweepPlan {
    use std::collections::{BTreeMap, HashSet};
    let mut jobs: BTreeMap<String, (Duration, Vec<String>)> = BTreeMap::new();
    let mut records = HashSet::new();
    let mut audio = Vec::new();
    for (key, age) in listing {
        if let Some((project, job_id, ..)) = keys::output_attempt(&key) {
            let (youngest, keys) = jobs.entry(keys::job_outputs(&project, job_id)).or_insert((Duration::MAX, Vec::new()));
            *youngest = (*youngest).min(age);
            keys.push(key);
        } else if let Some((_, stem_id, is_record)) = keys::stem(&key) {
            if is_record {
                records.insert(stem_id);
            } else {
                audio.push((key, stem_id, age));
            }
        }
    }
    let mut plan = SweepPlan { delete: Vec::new(), next_due: ORPHAN_AGE.min(retention) };
    for (youngest, keys) in jobs.into_values() {
        if youngest >= retention {
            plan.delete.extend(keys);
        } else {
            plan.next_due = plan.next_due.min(retention - youngest);
        }
    }
    for (key, stem_id, age) in audio {
        if records.contains(&stem_id) {
            continue;
        }
        if age >= ORPHAN_AGE {
            plan.delete.push(key);
        } else {
            plan.next_due = plan.next_due.min(ORPHAN_AGE - age);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::StemId;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_sweep_deletes_whole_jobs_past_retention_and_only_old_audio_without_a_record() {
        let project: ProjectId = "p1".parse().unwrap();
        let (old_job, young_job) = (JobId::new(), JobId::new());
        let (kept, orphan, fresh_orphan) = (StemId::new(), StemId::new(), StemId::new());
        let (wav, opus) = (JobFile::Mix(crate::audio::Format::Wav), JobFile::Mix(crate::audio::Format::Opus));
        let listing = vec![
            (keys::result(&project, old_job, 1, wav), 50 * MINUTE),
            (keys::result(&project, old_job, 2, wav), 40 * MINUTE),
            (keys::result(&project, old_job, 2, opus), 40 * MINUTE),
            (keys::result(&project, old_job, 2, JobFile::Analysis), 40 * MINUTE),
            // One young output keeps its whole job.
            (keys::result(&project, young_job, 1, wav), 45 * MINUTE),
            (keys::result(&project, young_job, 2, opus), 5 * MINUTE),
            (keys::stem_audio(&project, kept, "wav"), 600 * MINUTE),
            (keys::stem_record(&project, kept), 600 * MINUTE),
            (keys::stem_audio(&project, orphan, "flac"), 61 * MINUTE),
            (keys::stem_audio(&project, fresh_orphan, "wav"), 20 * MINUTE),
            ("p1/unrelated.txt".to_string(), 900 * MINUTE),
        ];
        let plan = plan_sweep(listing, 30 * MINUTE);
        let expected = vec![
            keys::result(&project, old_job, 1, wav),
            keys::result(&project, old_job, 2, wav),
            keys::result(&project, old_job, 2, opus),
            keys::result(&project, old_job, 2, JobFile::Analysis),
            keys::stem_audio(&project, orphan, "flac"),
        ];
        assert_eq!(plan, SweepPlan { delete: expected, next_due: 25 * MINUTE });
        // With nothing due sooner, the next pass is an hour away at most (the orphan rule).
        assert_eq!(plan_sweep(Vec::new(), Duration::from_secs(30 * 86_400)).next_due, ORPHAN_AGE);
        assert_eq!(plan_sweep(Vec::new(), 2 * MINUTE).next_due, 2 * MINUTE);
    }

    #[test]
    fn storage_urls_name_a_bucket_and_a_prefix() {
        assert_eq!(StorageUrl::parse("s3://media/team/a/").unwrap(), StorageUrl { bucket: "media".into(), prefix: "team/a".into() });
        assert_eq!(StorageUrl::parse("s3://media").unwrap(), StorageUrl { bucket: "media".into(), prefix: String::new() });
        assert!(StorageUrl::parse("s3:///x").is_err());
        assert!(StorageUrl::parse("gs://media/x").unwrap_err().starts_with("expected s3://bucket/prefix"));
        assert_eq!(ObjectKey::new("team/a", "p1/stems/x.wav").location().as_ref(), "team/a/p1/stems/x.wav");
        assert_eq!(ObjectKey::new("", "p1/stems/x.wav").location().as_ref(), "p1/stems/x.wav");
    }
}
