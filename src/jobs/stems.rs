//! The stems of each project, as files with a JSON record beside each (where: [`MediaLayout`]).
//!
//! A record is written (atomically) only after its audio file is in place, so a listed stem
//! always has its file. Uploads land in a temporary file first; leftovers from a crash are
//! removed at start.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::layout::MediaLayout;
use super::model::{ProjectId, StemId, Timestamp};
use crate::audio::{StemInfo, StemSource};

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
    layout: MediaLayout,
}

impl StemStore {
    pub fn new(layout: MediaLayout) -> Self {
        Self { layout }
    }

    fn audio_path(&self, project: &ProjectId, stem: &Stem) -> PathBuf {
        self.layout.stem_audio(project, stem.stem_id, &stem.format)
    }

    fn record_path(&self, project: &ProjectId, stem_id: StemId) -> PathBuf {
        self.layout.stem_record(project, stem_id)
    }

    /// A fresh temporary path for an upload into `project`.
    pub async fn upload_path(&self, project: &ProjectId) -> io::Result<PathBuf> {
        tokio::fs::create_dir_all(self.layout.stems_dir(project)).await?;
        Ok(self.layout.upload_temporary(project))
    }

    /// Moves a probed upload into place and records it.
    pub async fn commit(&self, project: &ProjectId, upload: &Path, name: String, info: StemInfo, size_bytes: u64) -> io::Result<Stem> {
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
        let audio = self.audio_path(project, &stem);
        tokio::fs::rename(upload, &audio).await?;
        let record = self.record_path(project, stem.stem_id);
        let json = serde_json::to_vec_pretty(&stem).expect("a stem serialises");
        let written = write_atomically(&record, json).await;
        if let Err(err) = written {
            let _ = tokio::fs::remove_file(&audio).await;
            return Err(err);
        }
        Ok(stem)
    }

    /// The project's stems, oldest first. A project that has none does not exist. Listed and
    /// read in one blocking call rather than one per record.
    pub async fn list(&self, project: &ProjectId) -> io::Result<Vec<Stem>> {
        let dir = self.layout.stems_dir(project);
        blocking(move || {
            let mut stems = Vec::new();
            for path in stem_records(&dir)? {
                let path = path?;
                match serde_json::from_slice::<Stem>(&std::fs::read(&path)?) {
                    Ok(stem) => stems.push(stem),
                    Err(err) => tracing::warn!(path = %path.display(), %err, "skipping an unreadable stem record"),
                }
            }
            stems.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
            Ok(stems)
        })
        .await
    }

    /// Whether `project` has a stem, without reading any record (every subscriber of a project
    /// without jobs asks, all at once after a restart).
    pub async fn has_any(&self, project: &ProjectId) -> io::Result<bool> {
        let dir = self.layout.stems_dir(project);
        blocking(move || stem_records(&dir)?.next().transpose().map(|first| first.is_some())).await
    }

    /// What the engine needs to mix this stem.
    pub fn source(&self, project: &ProjectId, stem: &Stem) -> StemSource {
        StemSource { id: stem.stem_id.to_string(), path: self.audio_path(project, stem), name: stem.name.clone() }
    }

    /// Removes a stem; false when there was no such stem.
    pub async fn delete(&self, project: &ProjectId, stem_id: StemId) -> io::Result<bool> {
        let record = match tokio::fs::read(self.record_path(project, stem_id)).await {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(err),
        };
        let stem: Stem = serde_json::from_slice(&record).map_err(io::Error::other)?;
        // The record goes first: a stem without a record is invisible, the reverse would be listed.
        tokio::fs::remove_file(self.record_path(project, stem_id)).await?;
        match tokio::fs::remove_file(self.audio_path(project, &stem)).await {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        Ok(true)
    }
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
