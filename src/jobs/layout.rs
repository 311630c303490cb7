//! Where everything lives under the data root: the one owner of every path, every temporary name
//! and the URL a result is served at. Nothing else joins path segments or knows a prefix, so a
//! different storage (object storage) replaces this one type.
//!
//! ```text
//! {root}/.mixd/                                   the job database (never served)
//! {root}/{project}/stems/{stem_id}.{format}       a stem's audio
//! {root}/{project}/stems/{stem_id}.json           its record, written after the audio
//! {root}/{project}/mix_outputs/{job}/final_mix.wav  a job's result, immutable
//! {root}/{project}/mix_outputs/{job}/analysis.json  its waveform and loudness, immutable
//! {root}/{project}/mix_outputs/final_mix.wav      the legacy "newest mix", replaced by each new result
//! ```
//!
//! Files being written carry a dot-prefixed temporary name ending in `.partial` and are renamed
//! into place when complete: the media route serves no name that starts with a dot, and a crash
//! leaves only such names behind, which [`MediaLayout::remove_partials`] clears at start.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::model::{JobId, ProjectId, StemId};

const DATABASE_DIR: &str = ".mixd";
const STEMS_DIR: &str = "stems";
const OUTPUTS_DIR: &str = "mix_outputs";
const RESULT_FILE: &str = "final_mix.wav";
const ANALYSIS_FILE: &str = "analysis.json";
const PARTIAL_SUFFIX: &str = ".partial";
/// Temporary names, by what is being written.
const UPLOAD_PREFIX: &str = ".upload-";
const RECORD_PREFIX: &str = ".record-";
const RESULT_PREFIX: &str = ".final_mix.";
const TEMPORARY_PREFIXES: [&str; 3] = [UPLOAD_PREFIX, RECORD_PREFIX, RESULT_PREFIX];

/// Cheap to clone: every request's state holds one.
#[derive(Debug, Clone)]
pub struct MediaLayout {
    root: Arc<Path>,
}

/// A file the media route may serve.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaFile {
    pub path: PathBuf,
    /// Its bytes never change once it exists: a job's result or a stem.
    pub immutable: bool,
}

impl MediaLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: Arc::from(root.into()) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn database_dir(&self) -> PathBuf {
        self.root.join(DATABASE_DIR)
    }

    /// Every project that has a directory under the root (the database's directory is not one:
    /// its name is not a project id).
    pub fn projects(&self) -> io::Result<Vec<ProjectId>> {
        let entries = match std::fs::read_dir(&*self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let mut projects = Vec::new();
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                if let Some(project) = entry.file_name().to_str().and_then(|name| name.parse().ok()) {
                    projects.push(project);
                }
            }
        }
        Ok(projects)
    }

    pub fn stems_dir(&self, project: &ProjectId) -> PathBuf {
        self.root.join(project.as_str()).join(STEMS_DIR)
    }

    pub fn stem_audio(&self, project: &ProjectId, stem_id: StemId, format: &str) -> PathBuf {
        self.stems_dir(project).join(format!("{stem_id}.{format}"))
    }

    pub fn stem_record(&self, project: &ProjectId, stem_id: StemId) -> PathBuf {
        self.stems_dir(project).join(format!("{stem_id}.json"))
    }

    /// Whether `path` (in a stems directory) is a stem's record.
    pub fn is_stem_record(path: &Path) -> bool {
        path.extension().is_some_and(|e| e == "json") && !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
    }

    /// A fresh temporary name for an upload into `project`.
    pub fn upload_temporary(&self, project: &ProjectId) -> PathBuf {
        self.stems_dir(project).join(format!("{UPLOAD_PREFIX}{}{PARTIAL_SUFFIX}", uuid::Uuid::new_v4()))
    }

    /// A fresh temporary name beside `record`, for writing it atomically.
    pub fn record_temporary(record: &Path) -> PathBuf {
        record.with_file_name(format!("{RECORD_PREFIX}{}{PARTIAL_SUFFIX}", uuid::Uuid::new_v4()))
    }

    pub fn job_outputs(&self, project: &ProjectId, job_id: JobId) -> PathBuf {
        self.root.join(project.as_str()).join(OUTPUTS_DIR).join(job_id.to_string())
    }

    /// Where a job's result is, once complete.
    pub fn result(&self, project: &ProjectId, job_id: JobId) -> PathBuf {
        self.job_outputs(project, job_id).join(RESULT_FILE)
    }

    /// Where run number `attempt` of a job leaves its finished result, before the run (if it still
    /// holds the job) links it into place as [`Self::result`].
    pub fn result_staged(&self, project: &ProjectId, job_id: JobId, attempt: u32) -> PathBuf {
        self.job_outputs(project, job_id).join(format!("{RESULT_PREFIX}{job_id}.{attempt}{PARTIAL_SUFFIX}"))
    }

    /// A job's analysis (waveform peaks, loudness over time), beside its result.
    pub fn analysis(&self, project: &ProjectId, job_id: JobId) -> PathBuf {
        self.job_outputs(project, job_id).join(ANALYSIS_FILE)
    }

    /// Where run number `attempt` leaves the analysis before it is linked into place with the result.
    pub fn analysis_staged(&self, project: &ProjectId, job_id: JobId, attempt: u32) -> PathBuf {
        self.job_outputs(project, job_id).join(format!("{RESULT_PREFIX}{job_id}.{attempt}.analysis{PARTIAL_SUFFIX}"))
    }

    /// Where run number `attempt` of a job writes its result, before renaming it to the staged name.
    pub fn result_temporary(&self, project: &ProjectId, job_id: JobId, attempt: u32) -> PathBuf {
        self.job_outputs(project, job_id).join(format!("{RESULT_PREFIX}{job_id}.{attempt}.writing{PARTIAL_SUFFIX}"))
    }

    /// Removes what earlier runs of a job left in its directory (their nodes died or stalled; a
    /// stalled one writing on finds its file gone, and its writes are fenced out anyway).
    pub fn remove_earlier_attempts(&self, project: &ProjectId, job_id: JobId, attempt: u32) -> io::Result<()> {
        let keep = [self.result_staged(project, job_id, attempt), self.result_temporary(project, job_id, attempt), self.analysis_staged(project, job_id, attempt)];
        let Ok(entries) = std::fs::read_dir(self.job_outputs(project, job_id)) else { return Ok(()) };
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with(RESULT_PREFIX) && name.ends_with(PARTIAL_SUFFIX) && !keep.contains(&path) {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// The legacy path of the project's newest complete mix.
    pub fn newest_result(&self, project: &ProjectId) -> PathBuf {
        self.root.join(project.as_str()).join(OUTPUTS_DIR).join(RESULT_FILE)
    }

    /// Where the newest result is staged before it replaces [`Self::newest_result`] in one rename.
    pub fn newest_result_temporary(&self, project: &ProjectId, job_id: JobId) -> PathBuf {
        self.root.join(project.as_str()).join(OUTPUTS_DIR).join(format!("{RESULT_PREFIX}{job_id}{PARTIAL_SUFFIX}"))
    }

    /// The URL a job's result is served at.
    pub fn result_url(project: &ProjectId, job_id: JobId) -> String {
        format!("/media/{project}/{OUTPUTS_DIR}/{job_id}/{RESULT_FILE}")
    }

    /// The file behind `/media/{path}`, if `path` names one the media route serves: a job's
    /// result, the newest result, or a stem's audio. Ids must parse, so nothing else under the
    /// root (records, temporary files, the database) and nothing outside it can be named.
    pub fn media_file(&self, path: &str) -> Option<MediaFile> {
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            [project, OUTPUTS_DIR, job, RESULT_FILE] => {
                let (project, job_id) = (project.parse().ok()?, job.parse().ok()?);
                Some(MediaFile { path: self.result(&project, job_id), immutable: true })
            }
            [project, OUTPUTS_DIR, job, ANALYSIS_FILE] => {
                let (project, job_id) = (project.parse().ok()?, job.parse().ok()?);
                Some(MediaFile { path: self.analysis(&project, job_id), immutable: true })
            }
            [project, OUTPUTS_DIR, RESULT_FILE] => Some(MediaFile { path: self.newest_result(&project.parse().ok()?), immutable: false }),
            [project, STEMS_DIR, file] => {
                let (stem, format) = file.split_once('.')?;
                if format == "json" || !format.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return None;
                }
                Some(MediaFile { path: self.stem_audio(&project.parse().ok()?, stem.parse().ok()?, format), immutable: true })
            }
            _ => None,
        }
    }

    /// Removes temporary files a crash left behind (uploads in progress, records, unfinished
    /// results) that are at least `min_age` old: on storage shared by several nodes, a younger one
    /// may be another node's file in the making. Returns how many.
    pub fn remove_partials(&self, min_age: Duration) -> io::Result<usize> {
        fn is_temporary(name: &str) -> bool {
            name.ends_with(PARTIAL_SUFFIX) && TEMPORARY_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
        }
        fn walk(dir: &Path, removed: &mut usize, depth: usize, min_age: Duration) -> io::Result<()> {
            // Deep enough for {project}/mix_outputs/{job}/; nothing is written deeper.
            if depth > 3 {
                return Ok(());
            }
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    walk(&entry.path(), removed, depth + 1, min_age)?;
                } else if kind.is_file() && is_temporary(&entry.file_name().to_string_lossy()) && entry.metadata()?.modified()?.elapsed().unwrap_or_default() >= min_age {
                    std::fs::remove_file(entry.path())?;
                    *removed += 1;
                }
            }
            Ok(())
        }
        let mut removed = 0;
        if self.root.exists() {
            walk(&self.root, &mut removed, 0, min_age)?;
        }
        Ok(removed)
    }

    /// Removes job result directories whose result is older than `retention`; returns how long
    /// until the oldest one left is due. The newest result is its own file and stays.
    pub fn remove_old_results(&self, retention: Duration) -> io::Result<Option<Duration>> {
        let mut next_due: Option<Duration> = None;
        for project in std::fs::read_dir(&*self.root)? {
            let Ok(jobs) = std::fs::read_dir(project?.path().join(OUTPUTS_DIR)) else { continue };
            for job in jobs {
                let dir = job?.path();
                let Ok(modified) = std::fs::metadata(dir.join(RESULT_FILE)).and_then(|m| m.modified()) else { continue };
                let age = modified.elapsed().unwrap_or_default();
                if age >= retention {
                    std::fs::remove_dir_all(&dir)?;
                    tracing::info!(dir = %dir.display(), "removed an output past its retention");
                } else {
                    let due = retention - age;
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                }
            }
        }
        Ok(next_due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_media_route_reaches_results_and_stems_only() {
        let layout = MediaLayout::new("/data");
        let project: ProjectId = "p1".parse().unwrap();
        let (job, stem) = (JobId::new(), StemId::new());
        let result = layout.media_file(&format!("p1/mix_outputs/{job}/final_mix.wav")).unwrap();
        assert_eq!(result, MediaFile { path: layout.result(&project, job), immutable: true });
        assert_eq!(MediaLayout::result_url(&project, job), format!("/media/p1/mix_outputs/{job}/final_mix.wav"));
        let newest = layout.media_file("p1/mix_outputs/final_mix.wav").unwrap();
        assert_eq!(newest, MediaFile { path: PathBuf::from("/data/p1/mix_outputs/final_mix.wav"), immutable: false });
        let audio = layout.media_file(&format!("p1/stems/{stem}.flac")).unwrap();
        assert_eq!(audio, MediaFile { path: layout.stem_audio(&project, stem, "flac"), immutable: true });
        let temporary = layout.result_temporary(&project, job, 1);
        let temporary_name = temporary.file_name().unwrap().to_string_lossy();
        for refused in [
            format!("p1/stems/{stem}.json"),
            format!("p1/mix_outputs/{job}/{temporary_name}"),
            ".mixd/jobs.sqlite3".to_string(),
            "../etc/passwd".to_string(),
            "p1/mix_outputs/not-a-uuid/final_mix.wav".to_string(),
            format!("p 1/mix_outputs/{job}/final_mix.wav"),
            format!("p1/stems/{stem}.wav/x"),
            "p1/stems".to_string(),
            String::new(),
        ] {
            assert_eq!(layout.media_file(&refused), None, "{refused}");
        }
    }

    #[test]
    fn partial_files_are_removed_at_start_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let layout = MediaLayout::new(root.path());
        let project: ProjectId = "p1".parse().unwrap();
        let job = JobId::new();
        std::fs::create_dir_all(layout.job_outputs(&project, job)).unwrap();
        std::fs::create_dir_all(layout.stems_dir(&project)).unwrap();
        let record = layout.stem_record(&project, StemId::new());
        let partials = [
            layout.upload_temporary(&project),
            MediaLayout::record_temporary(&record),
            layout.result_temporary(&project, job, 1),
            layout.result_staged(&project, job, 2),
            layout.newest_result_temporary(&project, job),
        ];
        let kept = [record, layout.result(&project, job), layout.newest_result(&project)];
        for path in partials.iter().chain(&kept) {
            std::fs::write(path, b"x").unwrap();
        }
        assert_eq!(layout.remove_partials(Duration::ZERO).unwrap(), partials.len());
        assert!(partials.iter().all(|p| !p.exists()));
        assert!(kept.iter().all(|p| p.exists()));
    }

    #[test]
    fn results_past_retention_are_removed_and_the_next_due_is_reported() {
        let root = tempfile::tempdir().unwrap();
        let layout = MediaLayout::new(root.path());
        let project: ProjectId = "p1".parse().unwrap();
        let (old, fresh) = (JobId::new(), JobId::new());
        for job in [old, fresh] {
            std::fs::create_dir_all(layout.job_outputs(&project, job)).unwrap();
            std::fs::write(layout.result(&project, job), b"RIFF").unwrap();
        }
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(layout.result(&project, old)).unwrap().set_modified(an_hour_ago).unwrap();
        std::fs::write(layout.newest_result(&project), b"legacy").unwrap();

        let next = layout.remove_old_results(Duration::from_secs(1800)).unwrap().unwrap();
        assert!(!layout.job_outputs(&project, old).exists());
        assert!(layout.result(&project, fresh).exists());
        assert!(layout.newest_result(&project).exists(), "the legacy newest mix stays");
        assert!(next > Duration::from_secs(1790) && next <= Duration::from_secs(1800), "{next:?}");
    }
}
