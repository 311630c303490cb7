//! The stems of each project, as files with a JSON record beside each (where: [`MediaLayout`],
//! or on object storage, [`super::layout::keys`]).
//!
//! A record is written (atomically) only after its audio is in place, so a listed stem always has
//! its audio. Uploads land in a local temporary file first; leftovers from a crash are removed at
//! start. On object storage a listing reads the records only, never the audio.

use std::io;
use std::path::{Path, PathBuf};

use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::MediaError;
use super::layout::{keys, MediaLayout};
use super::storage::Media;
use crate::audio::{StemInfo, StemSource};
use crate::ids::{ProjectId, StemId, Timestamp};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Stem {
    pub stem_id: StemId,
    /// The original file name, sanitised.
    pub name: String,
    pub format: String,
    pub codec: String,
    pub sample_rate: u32,
    pub channels: usize,
    pub duration_s: f64,
    pub size_bytes: u64,
    pub created_at: Timestamp,
    /// Damaged packets skipped while the file still decoded to its end.
    #[serde(default)]
    pub skipped_packets: u64,
}

#[derive(Debug, Clone)]
pub struct StemStore {
    media: Media,
}

/// Records read at once when listing a project on object storage.
const RECORD_READS: usize = 16;

impl StemStore {
    pub fn new(media: Media) -> Self {
        Self { media }
    }

    fn audio_path(&self, project: &ProjectId, stem: &Stem) -> PathBuf {
        self.media.work().stem_audio(project, stem.stem_id, &stem.format)
    }

    fn record_path(&self, project: &ProjectId, stem_id: StemId) -> PathBuf {
        self.media.work().stem_record(project, stem_id)
    }

    /// A fresh temporary path for an upload into `project`.
    pub async fn upload_path(&self, project: &ProjectId) -> io::Result<PathBuf> {
        if let Some(objects) = self.media.objects() {
            return Ok(objects.cache().temporary());
        }
        tokio::fs::create_dir_all(self.media.work().stems_dir(project)).await?;
        Ok(self.media.work().upload_temporary(project))
    }

    /// Moves a probed upload into place and records it.
    pub async fn commit(&self, project: &ProjectId, upload: &Path, name: String, info: StemInfo, size_bytes: u64) -> Result<Stem, MediaError> {
        let stem = Stem {
            stem_id: StemId::new(),
            name,
            format: info.format.clone(),
            codec: info.codec.clone(),
            sample_rate: info.sample_rate,
            channels: info.channels,
            duration_s: info.duration_s(),
            size_bytes,
            created_at: Timestamp::now(),
            skipped_packets: info.skipped_packets,
        };
        let json = serde_json::to_vec_pretty(&stem).expect("a stem serialises");
        if let Some(objects) = self.media.objects() {
            let audio = keys::stem_audio(project, stem.stem_id, &stem.format);
            objects.put_file(upload, &objects.key(&audio)).await?;
            if let Err(err) = objects.put_bytes(&objects.key(&keys::stem_record(project, stem.stem_id)), json).await {
                // Not listed without its record; should this delete fail too, the sweep finds it.
                let _ = objects.delete(&objects.key(&audio)).await;
                return Err(err);
            }
            objects.keep_in_cache(upload, &audio).await;
            return Ok(stem);
        }
        let audio = self.audio_path(project, &stem);
        tokio::fs::rename(upload, &audio).await?;
        let record = self.record_path(project, stem.stem_id);
        let written = write_atomically(&record, json).await;
        if let Err(err) = written {
            let _ = tokio::fs::remove_file(&audio).await;
            return Err(err.into());
        }
        Ok(stem)
    }

    /// The project's stems, oldest first. A project that has none does not exist. Listed and
    /// read in one blocking call rather than one per record.
    pub async fn list(&self, project: &ProjectId) -> Result<Vec<Stem>, MediaError> {
        if let Some(objects) = self.media.objects() {
            let records: Vec<String> = objects
                .list(&keys::stems_prefix(project))
                .try_filter_map(|(key, _)| async move { Ok(keys::stem(&key).filter(|(.., is_record)| *is_record).map(|_| key)) })
                .try_collect()
                .await?;
            let reads = records.into_iter().map(|key| async move { (objects.get_bytes(&objects.key(&key)).await, key) });
            let mut stems = Vec::new();
            let mut reads = futures_util::stream::iter(reads).buffer_unordered(RECORD_READS);
            while let Some((read, key)) = reads.next().await {
                match read.map(|bytes| serde_json::from_slice::<Stem>(&bytes)) {
                    Ok(Ok(stem)) => stems.push(stem),
                    // Deleted between the listing and the read.
                    Err(MediaError::NotFound) => {}
                    Err(err) => return Err(err),
                    Ok(Err(err)) => tracing::warn!(key, %err, "skipping an unreadable stem record"),
                }
            }
            sort_stems(&mut stems);
            return Ok(stems);
        }
        let dir = self.media.work().stems_dir(project);
        blocking(move || {
            let mut stems = Vec::new();
            for path in stem_records(&dir)? {
                let path = path?;
                match serde_json::from_slice::<Stem>(&std::fs::read(&path)?) {
                    Ok(stem) => stems.push(stem),
                    Err(err) => tracing::warn!(path = %path.display(), %err, "skipping an unreadable stem record"),
                }
            }
            sort_stems(&mut stems);
            Ok(stems)
        })
        .await
        .map_err(MediaError::from)
    }

    /// Whether `project` has a stem, without reading any record (every subscriber of a project
    /// without jobs asks, all at once after a restart).
    pub async fn has_any(&self, project: &ProjectId) -> Result<bool, MediaError> {
        if let Some(objects) = self.media.objects() {
            let mut listing = objects.list(&keys::stems_prefix(project));
            while let Some((key, _)) = listing.try_next().await? {
                if keys::stem(&key).is_some_and(|(.., is_record)| is_record) {
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        let dir = self.media.work().stems_dir(project);
        blocking(move || stem_records(&dir)?.next().transpose().map(|first| first.is_some())).await.map_err(MediaError::from)
    }

    /// What the engine needs to mix this stem. On object storage the path is the stem's key, which
    /// the node that runs the mix fetches into its cache.
    pub fn source(&self, project: &ProjectId, stem: &Stem) -> StemSource {
        let path = match self.media.objects() {
            Some(_) => PathBuf::from(keys::stem_audio(project, stem.stem_id, &stem.format)),
            None => self.audio_path(project, stem),
        };
        StemSource { id: stem.stem_id.to_string(), path, name: stem.name.clone() }
    }

    /// Removes a stem; returns it, or `None` when there was no such stem.
    pub async fn delete(&self, project: &ProjectId, stem_id: StemId) -> Result<Option<Stem>, MediaError> {
        if let Some(objects) = self.media.objects() {
            let record = objects.key(&keys::stem_record(project, stem_id));
            let stem: Stem = match objects.get_bytes(&record).await {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other)?,
                Err(MediaError::NotFound) => return Ok(None),
                Err(err) => return Err(err),
            };
            objects.delete(&record).await?;
            if let Err(err) = objects.delete_stem_audio(&keys::stem_audio(project, stem_id, &stem.format)).await {
                tracing::warn!(%err, %stem_id, "could not delete a stem's audio; the storage sweep will");
            }
            return Ok(Some(stem));
        }
        let record = match tokio::fs::read(self.record_path(project, stem_id)).await {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let stem: Stem = serde_json::from_slice(&record).map_err(io::Error::other)?;
        // The record goes first (on both storages): a stem without a record is invisible, the reverse would be listed.
        tokio::fs::remove_file(self.record_path(project, stem_id)).await?;
        match tokio::fs::remove_file(self.audio_path(project, &stem)).await {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err.into()),
            _ => {}
        }
        Ok(Some(stem))
    }
}

fn sort_stems(stems: &mut [Stem]) {
    stems.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
}

/// Writes via a temporary file and a rename, with fsyncs, so readers see all or nothing.
async fn write_atomically(path: &Path, bytes: Vec<u8>) -> io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let dir = path.parent().expect("records live in a directory");
        let temporary = MediaLayout::record_temporary(&path);
        let written = (|| {
            let mut file = std::fs::File::create(&temporary)?;
            io::Write::write_all(&mut file, &bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written
    })
    .await
    .map_err(io::Error::other)?
}

/// The stem records in `dir`; none when it does not exist.
fn stem_records(dir: &Path) -> io::Result<impl Iterator<Item = io::Result<PathBuf>>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => Some(entries),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(err),
    };
    let paths = entries.into_iter().flatten().map(|entry| entry.map(|entry| entry.path()));
    Ok(paths.filter(|path| path.as_ref().map_or(true, |path| MediaLayout::is_stem_record(path))))
}

/// Runs file work off the runtime.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(io::Error::other)?
}

/// A file name safe to store and show: the last path component, with anything but letters,
/// digits, spaces and `._-()` replaced, and no leading dots.
pub fn sanitize_file_name(raw: &str) -> String {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last.chars().map(|c| if c.is_alphanumeric() || " ._-()".contains(c) { c } else { '_' }).collect();
    let trimmed = cleaned.trim().trim_start_matches('.').trim();
    let name: String = trimmed.chars().take(128).collect();
    if name.is_empty() {
        "stem".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_sanitised() {
        assert_eq!(sanitize_file_name("drums.wav"), "drums.wav");
        assert_eq!(sanitize_file_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_file_name("C:\\Users\\me\\Lead Vox (take 2).wav"), "Lead Vox (take 2).wav");
        assert_eq!(sanitize_file_name("..hidden"), "hidden");
        assert_eq!(sanitize_file_name("a\0b<script>.wav"), "a_b_script_.wav");
        assert_eq!(sanitize_file_name(""), "stem");
        assert_eq!(sanitize_file_name("/"), "stem");
        assert_eq!(sanitize_file_name(&"x".repeat(300)).len(), 128);
    }
}
