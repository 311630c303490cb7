//! The one decision of where media live, made at start: the local data root, or object storage
//! with this node's work directory. Every operation that differs between the two is a method
//! here, with both cases side by side, so that they cannot drift.

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::cache::CachedFile;
use super::error::MediaError;
use super::layout::{keys, JobFile, MediaLayout};
use super::objects::{ObjectInfo, ObjectKey, ObjectMedia};
use crate::audio::{Format, StemSource};
use crate::ids::{JobId, ProjectId, StemId};

/// Where stems and mixes are kept. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Media {
    /// Everything under the data root.
    Local(MediaLayout),
    /// Stems and mixes in a bucket; mixes are written in this node's `work` directory first.
    Object { objects: ObjectMedia, work: MediaLayout },
}

/// A file `/media` serves, once the job layer has decided which job's result a name means.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaFile {
    /// One of a complete job's files.
    Result {
        project: ProjectId,
        job_id: JobId,
        file: JobFile,
    },
    Stem {
        project: ProjectId,
        stem_id: StemId,
        format: String,
    },
}

/// A file opened for reading, with its size and time.
pub enum Opened {
    File { file: tokio::fs::File, info: ObjectInfo },
    Object { objects: ObjectMedia, key: ObjectKey, info: ObjectInfo },
}

impl Opened {
    pub fn info(&self) -> ObjectInfo {
        match self {
            Opened::File { info, .. } | Opened::Object { info, .. } => *info,
        }
    }

    /// `range` of the file's bytes, as they arrive.
    pub async fn read(self, range: Range<u64>) -> Result<BoxStream<'static, Result<Bytes, MediaError>>, MediaError> {
        match self {
            Opened::File { mut file, .. } => {
                file.seek(std::io::SeekFrom::Start(range.start)).await?;
                let reader = tokio_util::io::ReaderStream::with_capacity(file.take(range.end - range.start), 64 * 1024);
                Ok(reader.map_err(MediaError::Io).boxed())
            }
            // An empty object has no range to ask for.
            Opened::Object { .. } if range.is_empty() => Ok(futures_util::stream::empty().boxed()),
            Opened::Object { objects, key, .. } => objects.read(&key, range).await,
        }
    }

    /// A URL that lets whoever has it read the object for `expires_in`; `None` on the data root,
    /// which has no URL of its own.
    pub async fn presigned_url(&self, expires_in: Duration) -> Option<Result<url::Url, MediaError>> {
        match self {
            Opened::File { .. } => None,
            Opened::Object { objects, key, .. } => Some(objects.presigned_url(key, expires_in).await),
        }
    }
}

impl Media {
    /// Where runs write their results: the data root, or on object storage this node's work
    /// directory, from which they are stored.
    pub fn work(&self) -> &MediaLayout {
        match self {
            Media::Local(layout) => layout,
            Media::Object { work, .. } => work,
        }
    }

    pub fn objects(&self) -> Option<&ObjectMedia> {
        match self {
            Media::Local(_) => None,
            Media::Object { objects, .. } => Some(objects),
        }
    }

    /// Whether the storage answers: the data root is a readable directory, the bucket lets us in.
    pub async fn ping(&self) -> Result<(), MediaError> {
        match self {
            Media::Local(layout) => {
                let root = layout.root().to_path_buf();
                match tokio::task::spawn_blocking(move || std::fs::metadata(root).map(|meta| meta.is_dir())).await {
                    Ok(Ok(true)) => Ok(()),
                    Ok(Ok(false)) => Err(MediaError::Unavailable("the data root is not a directory".into())),
                    Ok(Err(err)) => Err(MediaError::Io(err)),
                    Err(err) => Err(MediaError::Unavailable(err.to_string())),
                }
            }
            Media::Object { objects, .. } => objects.ping().await,
        }
    }

    /// The projects that have anything stored.
    pub async fn projects(&self) -> Result<Vec<ProjectId>, MediaError> {
        match self {
            Media::Local(layout) => {
                let layout = layout.clone();
                tokio::task::spawn_blocking(move || layout.projects()).await.map_err(|err| MediaError::Unavailable(err.to_string()))?.map_err(MediaError::Io)
            }
            Media::Object { objects, .. } => objects.projects().await,
        }
    }

    /// Opens a file for `/media`. A job's outputs on object storage are those of the run that
    /// completed it (the highest attempt with a result, [`ObjectMedia::published_attempt`]).
    pub async fn open(&self, file: &MediaFile) -> Result<Opened, MediaError> {
        match self {
            Media::Local(layout) => {
                let path = match file {
                    MediaFile::Result { project, job_id, file } => layout.result(project, *job_id, *file),
                    MediaFile::Stem { project, stem_id, format } => layout.stem_audio(project, *stem_id, format),
                };
                let file = tokio::fs::File::open(path).await.map_err(not_found)?;
                let metadata = file.metadata().await.map_err(not_found)?;
                if !metadata.is_file() {
                    return Err(MediaError::NotFound);
                }
                let modified_nanos = metadata.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
                Ok(Opened::File { file, info: ObjectInfo { bytes: metadata.len(), modified_nanos } })
            }
            Media::Object { objects, .. } => {
                let relative = match file {
                    MediaFile::Stem { project, stem_id, format } => keys::stem_audio(project, *stem_id, format),
                    MediaFile::Result { project, job_id, file } => {
                        let attempt = objects.published_attempt(project, *job_id).await?.ok_or(MediaError::NotFound)?;
                        keys::result(project, *job_id, attempt, *file)
                    }
                };
                let key = objects.key(&relative);
                let info = objects.info(&key).await?;
                Ok(Opened::Object { objects: objects.clone(), key, info })
            }
        }
    }

    /// The stems as local files a mix can decode: as they are on the data root, or fetched into
    /// this node's cache and held there for as long as the returned handles live.
    pub async fn local_stems(&self, stems: &[StemSource]) -> Result<(Vec<StemSource>, Vec<CachedFile>), (MediaError, String)> {
        let Media::Object { objects, .. } = self else { return Ok((stems.to_vec(), Vec::new())) };
        let (mut local, mut held) = (Vec::new(), Vec::new());
        for stem in stems {
            let file = objects.fetch_stem(&stem.path.to_string_lossy()).await.map_err(|err| (err, stem.name.clone()))?;
            local.push(StemSource { path: file.path().to_path_buf(), ..stem.clone() });
            held.push(file);
        }
        Ok((local, held))
    }

    /// Removes what earlier runs of a job left (their nodes died, stalled or were canceled: never
    /// published), keeping run `attempt`'s own.
    pub async fn clear_earlier_attempts(&self, project: &ProjectId, job_id: JobId, attempt: u32) -> Result<(), MediaError> {
        let work = self.work().clone();
        let (owned_project, owned_job) = (project.clone(), job_id);
        tokio::task::spawn_blocking(move || work.remove_earlier_attempts(&owned_project, owned_job, attempt))
            .await
            .map_err(|err| MediaError::Unavailable(err.to_string()))??;
        if let Media::Object { objects, .. } = self {
            objects.delete_attempts_except(project, job_id, Some(attempt)).await?;
        }
        Ok(())
    }

    /// Makes run `attempt`'s staged files the job's, just before the job is reported complete.
    /// On the data root they are linked into place (a file already there came from an earlier run
    /// of the same job and inputs, which a node finished but did not get to report: it is kept);
    /// on object storage they are stored under the run's own keys, which the job's final update
    /// publishes. Either way nobody is served them before the job is complete, and then all at
    /// once. A missing or failed analysis is logged: the page then draws no waveform.
    pub async fn publish_result(&self, project: &ProjectId, job_id: JobId, attempt: u32, files: &[(JobFile, PathBuf)]) -> Result<(), MediaError> {
        for (file, staged) in files {
            let published = match self {
                Media::Local(layout) => match tokio::fs::hard_link(staged, layout.result(project, job_id, *file)).await {
                    Ok(()) => {
                        let _ = tokio::fs::remove_file(staged).await;
                        Ok(())
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                        tracing::info!(file = file.file_name(), "the file was already in place from an earlier run");
                        Ok(())
                    }
                    Err(err) => Err(MediaError::Io(err)),
                },
                Media::Object { objects, .. } if *file == JobFile::Analysis && !tokio::fs::try_exists(staged).await.unwrap_or(false) => Ok(()),
                Media::Object { objects, .. } => objects.put_file(staged, &objects.key(&keys::result(project, job_id, attempt, *file))).await,
            };
            match published {
                Err(err) if *file == JobFile::Analysis => tracing::warn!(%err, "could not publish the mix's analysis"),
                other => other?,
            }
        }
        Ok(())
    }

    /// Removes what run `attempt` leaves behind once it is over. On object storage its work files
    /// were this node's own, and what it stored is kept only if the job `completed` with it. On the
    /// data root, when the run did not `finish` the job but the job has `ended` (it was canceled),
    /// no empty directory is left behind (one holding a result stays); a run handed back or lost
    /// leaves it alone: the job's next run, maybe on another node, may be writing there already
    /// (its spill is an unnamed file, so the directory looks empty).
    pub async fn end_run(
        &self,
        project: &ProjectId,
        job_id: JobId,
        attempt: u32,
        staged: &[PathBuf],
        (finished, completed): (bool, bool),
        ended: impl std::future::Future<Output = bool>,
    ) {
        for file in staged {
            let _ = tokio::fs::remove_file(file).await;
        }
        let outputs = self.work().job_outputs(project, job_id);
        match self {
            Media::Object { objects, .. } => {
                let _ = tokio::fs::remove_dir(&outputs).await;
                if !completed {
                    for file in Format::ALL.map(JobFile::Mix).into_iter().chain([JobFile::Analysis]) {
                        if let Err(err) = objects.delete(&objects.key(&keys::result(project, job_id, attempt, file))).await {
                            tracing::warn!(%err, "could not delete what this run stored; output retention will");
                        }
                    }
                }
            }
            // A run that ended the job (in error) leaves nothing for a later run either.
            Media::Local(_) if !completed && (finished || ended.await) => {
                let _ = tokio::fs::remove_dir(&outputs).await;
            }
            Media::Local(_) => {}
        }
    }

    /// One pass of output retention; returns how long until the next is due.
    pub async fn sweep(&self, retention: Duration) -> Result<Duration, MediaError> {
        match self {
            Media::Local(layout) => {
                let layout = layout.clone();
                let next_due =
                    tokio::task::spawn_blocking(move || layout.remove_old_results(retention)).await.map_err(|err| MediaError::Unavailable(err.to_string()))??;
                Ok(next_due.unwrap_or(retention))
            }
            Media::Object { objects, .. } => objects.sweep(retention).await,
        }
    }
}

fn not_found(err: std::io::Error) -> MediaError {
    if err.kind() == std::io::ErrorKind::NotFound {
        MediaError::NotFound
    } else {
        MediaError::Io(err)
    }
}
