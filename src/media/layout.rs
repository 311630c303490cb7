//! Where everything lives under the data root: the one owner of every path, every temporary name
//! and the URL a result is served at. Nothing else joins path segments or knows a prefix, so a
//! different storage (object storage) replaces this one type.
//!
//! ```text
//! {root}/.mixd/                                   the job database (never served)
//! {root}/{project}/...                            {project} written so that case cannot collide:
//!                                                 `pA` is `p+a` (see `project_dir_name`)
//! {root}/{project}/stems/{stem_id}.{format}       a stem's audio
//! {root}/{project}/stems/{stem_id}.json           its record, written after the audio
//! {root}/{project}/mix_outputs/{job}/final_mix.{wav,flac,mp3,opus}  a job's files, immutable
//! {root}/{project}/mix_outputs/{job}/analysis.json  its waveform and loudness, immutable
//! {root}/{project}/mix_outputs/final_mix.wav      (not a file) the legacy path of the newest complete mix
//! ```
//!
//! Files being written carry a dot-prefixed temporary name ending in `.partial` and are renamed
//! into place when complete: the media route serves no name that starts with a dot, and a crash
//! leaves only such names behind, which [`MediaLayout::remove_partials`] clears at start.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::audio::Format;
use crate::ids::{JobId, ProjectId, StemId};

const DATABASE_DIR: &str = ".mixd";
const STEMS_DIR: &str = "stems";
const OUTPUTS_DIR: &str = "mix_outputs";
/// A job's mix in each format is `{RESULT_STEM}.{extension}`.
const RESULT_STEM: &str = "final_mix";
/// The legacy path of a project's newest mix (`{project}/mix_outputs/final_mix.wav`).
const NEWEST_FILE: &str = "final_mix.wav";
const ANALYSIS_FILE: &str = "analysis.json";
const PARTIAL_SUFFIX: &str = ".partial";
const ATTEMPT_PREFIX: &str = "attempt-";
const CACHE_DIR: &str = ".mixd-cache";
/// Temporary names, by what is being written.
const UPLOAD_PREFIX: &str = ".upload-";
const RECORD_PREFIX: &str = ".record-";
const RESULT_PREFIX: &str = ".final_mix.";
const TEMPORARY_PREFIXES: [&str; 3] = [UPLOAD_PREFIX, RECORD_PREFIX, RESULT_PREFIX];

/// The marker of a capital letter in a project's directory name; in no project id.
const CAPITAL: char = '+';

/// A project's directory name: its id with each capital letter written as `+` and the letter in
/// lower case (`pA` is `p+a`). Ids are case-sensitive, but many filesystems are not (macOS's and
/// Windows' by default, ext4 and tmpfs with casefold): there `pA` and `pa` would be one directory,
/// and a token for one would read the other's stems. No name stands for two ids, and no two names
/// differ only in case.
fn project_dir_name(project: &ProjectId) -> String {
    let mut name = String::with_capacity(project.as_str().len() + 4);
    for c in project.as_str().chars() {
        if c.is_ascii_uppercase() {
            name.push(CAPITAL);
            name.push(c.to_ascii_lowercase());
        } else {
            name.push(c);
        }
    }
    name
}

/// The project a directory name stands for; `None` for any other name (a capital letter, `+`
/// before anything but a small letter, no id).
fn project_of_dir_name(name: &str) -> Option<ProjectId> {
    let mut id = String::with_capacity(name.len());
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        match c {
            CAPITAL => id.push(chars.next().filter(char::is_ascii_lowercase)?.to_ascii_uppercase()),
            c if c.is_ascii_uppercase() => return None,
            c => id.push(c),
        }
    }
    id.parse().ok()
}

/// Cheap to clone: every request's state holds one.
#[derive(Debug, Clone)]
pub struct MediaLayout {
    root: Arc<Path>,
}

/// One of a job's files: its mix in one format, or its analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobFile {
    Mix(Format),
    Analysis,
}

impl JobFile {
    pub fn file_name(self) -> String {
        match self {
            JobFile::Mix(format) => format!("{RESULT_STEM}.{}", format.extension()),
            JobFile::Analysis => ANALYSIS_FILE.to_string(),
        }
    }

    fn parse(name: &str) -> Option<Self> {
        if name == ANALYSIS_FILE {
            return Some(JobFile::Analysis);
        }
        let (stem, extension) = name.split_once('.')?;
        // Exactly as written: `final_mix.WAV` names nothing.
        Format::from_extension(extension).filter(|format| stem == RESULT_STEM && format.extension() == extension).map(JobFile::Mix)
    }

    /// Where run `attempt` leaves the file before it is published, and the temporary name it is
    /// written under before that: dot-prefixed and ending in `.partial`, never served.
    fn staged_names(self, job_id: JobId, attempt: u32) -> (String, String) {
        let kind = match self {
            JobFile::Mix(format) => format.extension(),
            JobFile::Analysis => "analysis",
        };
        let base = format!("{RESULT_PREFIX}{job_id}.{attempt}.{kind}");
        (format!("{base}{PARTIAL_SUFFIX}"), format!("{base}.writing{PARTIAL_SUFFIX}"))
    }
}

/// What a `/media` path names, whichever storage holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaName {
    /// One of a job's files: immutable once the job is complete.
    Result {
        project: ProjectId,
        job_id: JobId,
        file: JobFile,
    },
    /// The legacy path of the project's newest complete mix.
    Newest {
        project: ProjectId,
    },
    Stem {
        project: ProjectId,
        stem_id: StemId,
        format: String,
    },
}

impl MediaName {
    /// Whether its bytes never change once it exists: a job's result or a stem, not the legacy
    /// path of the newest mix.
    pub fn is_immutable(&self) -> bool {
        !matches!(self, MediaName::Newest { .. })
    }
}

/// Object keys on object storage, relative to the bucket's prefix: the same names as under the
/// local root, except that a job's outputs are kept per run (`attempt-N/`) and the job's final
/// update is what publishes one of them ([`super::objects`]).
pub mod keys {
    use super::*;

    pub fn stems_prefix(project: &ProjectId) -> String {
        format!("{project}/{STEMS_DIR}/")
    }

    pub fn stem_audio(project: &ProjectId, stem_id: StemId, format: &str) -> String {
        format!("{project}/{STEMS_DIR}/{stem_id}.{format}")
    }

    pub fn stem_record(project: &ProjectId, stem_id: StemId) -> String {
        format!("{project}/{STEMS_DIR}/{stem_id}.json")
    }

    /// Which stem a key in a stems prefix belongs to, and whether it is the record (else the audio).
    pub fn stem(key: &str) -> Option<(ProjectId, StemId, bool)> {
        match key.split('/').collect::<Vec<_>>().as_slice() {
            [project, STEMS_DIR, file] => {
                let (stem, format) = file.split_once('.')?;
                Some((project.parse().ok()?, stem.parse().ok()?, format == "json"))
            }
            _ => None,
        }
    }

    pub fn job_outputs(project: &ProjectId, job_id: JobId) -> String {
        format!("{project}/{OUTPUTS_DIR}/{job_id}/")
    }

    pub fn attempt_outputs(project: &ProjectId, job_id: JobId, attempt: u32) -> String {
        format!("{project}/{OUTPUTS_DIR}/{job_id}/{ATTEMPT_PREFIX}{attempt}/")
    }

    pub fn result(project: &ProjectId, job_id: JobId, attempt: u32, file: JobFile) -> String {
        format!("{}{}", attempt_outputs(project, job_id, attempt), file.file_name())
    }

    /// Which run and which file a key under a job's outputs is: (job, attempt, file).
    pub fn output_attempt(key: &str) -> Option<(ProjectId, JobId, u32, JobFile)> {
        match key.split('/').collect::<Vec<_>>().as_slice() {
            [project, OUTPUTS_DIR, job, attempt, file] => {
                let attempt = attempt.strip_prefix(ATTEMPT_PREFIX)?.parse().ok()?;
                Some((project.parse().ok()?, job.parse().ok()?, attempt, JobFile::parse(file)?))
            }
            _ => None,
        }
    }

    /// The project a top-level prefix (`p1/`) names.
    pub fn project(prefix: &str) -> Option<ProjectId> {
        prefix.trim_end_matches('/').parse().ok()
    }
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

    /// Where stems fetched from object storage are kept, unless `--cache-dir` says otherwise.
    pub fn default_cache_dir(&self) -> PathBuf {
        self.root.join(CACHE_DIR)
    }

    fn project_dir(&self, project: &ProjectId) -> PathBuf {
        self.root.join(project_dir_name(project))
    }

    /// Renames the directories of projects whose ids have capital letters from the plain id an
    /// earlier release used (`pA`) to [`project_dir_name`] (`p+a`); returns how many. Run at start,
    /// before anything reads the root. A project with a directory under both names stops the start, named.
    pub fn rename_legacy_project_dirs(&self) -> io::Result<usize> {
        let entries = match std::fs::read_dir(&*self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        let mut renamed = 0;
        for entry in entries {
            let entry = entry?;
            let Some(project) = entry.file_name().to_str().and_then(|name| name.parse::<ProjectId>().ok()) else { continue };
            if !entry.file_type()?.is_dir() || !project.as_str().bytes().any(|b| b.is_ascii_uppercase()) {
                continue;
            }
            let target = self.project_dir(&project);
            if target.exists() {
                return Err(io::Error::other(format!("project {project} has a directory under its old name and its new one, {}: merge them by hand", target.display())));
            }
            std::fs::rename(entry.path(), &target)?;
            renamed += 1;
        }
        Ok(renamed)
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
                if let Some(project) = entry.file_name().to_str().and_then(project_of_dir_name) {
                    projects.push(project);
                }
            }
        }
        Ok(projects)
    }

    pub fn stems_dir(&self, project: &ProjectId) -> PathBuf {
        self.project_dir(project).join(STEMS_DIR)
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
        self.project_dir(project).join(OUTPUTS_DIR).join(job_id.to_string())
    }

    /// Where one of a job's files is, once the job is complete.
    pub fn result(&self, project: &ProjectId, job_id: JobId, file: JobFile) -> PathBuf {
        self.job_outputs(project, job_id).join(file.file_name())
    }

    /// Where run number `attempt` of a job leaves one of its finished files, before the run (if
    /// it still holds the job) links it into place as [`Self::result`].
    pub fn result_staged(&self, project: &ProjectId, job_id: JobId, attempt: u32, file: JobFile) -> PathBuf {
        self.job_outputs(project, job_id).join(file.staged_names(job_id, attempt).0)
    }

    /// Where run number `attempt` of a job writes one of its files, before renaming it to the
    /// staged name.
    pub fn result_temporary(&self, project: &ProjectId, job_id: JobId, attempt: u32, file: JobFile) -> PathBuf {
        self.job_outputs(project, job_id).join(file.staged_names(job_id, attempt).1)
    }

    /// Removes what earlier runs of a job left in its directory (their nodes died or stalled; a
    /// stalled one writing on finds its file gone, and its writes are fenced out anyway).
    pub fn remove_earlier_attempts(&self, project: &ProjectId, job_id: JobId, attempt: u32) -> io::Result<()> {
        let own = format!("{RESULT_PREFIX}{job_id}.{attempt}.");
        let Ok(entries) = std::fs::read_dir(self.job_outputs(project, job_id)) else { return Ok(()) };
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with(RESULT_PREFIX) && name.ends_with(PARTIAL_SUFFIX) && !name.starts_with(&own) {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// The URL a job's mix in `format` is served at.
    pub fn result_url(project: &ProjectId, job_id: JobId, format: Format) -> String {
        format!("/media/{project}/{OUTPUTS_DIR}/{job_id}/{}", JobFile::Mix(format).file_name())
    }

    /// What `/media/{path}` names, if it names something the media route serves: a job's result
    /// or analysis, the newest result, or a stem's audio. Ids must parse, so nothing else under
    /// the root (records, temporary files, the database) and nothing outside it can be named.
    pub fn media_name(path: &str) -> Option<MediaName> {
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            [project, OUTPUTS_DIR, NEWEST_FILE] => Some(MediaName::Newest { project: project.parse().ok()? }),
            [project, OUTPUTS_DIR, job, file] => Some(MediaName::Result { project: project.parse().ok()?, job_id: job.parse().ok()?, file: JobFile::parse(file)? }),
            [project, STEMS_DIR, file] => {
                let (stem, format) = file.split_once('.')?;
                if format == "json" || !format.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return None;
                }
                Some(MediaName::Stem { project: project.parse().ok()?, stem_id: stem.parse().ok()?, format: format.to_string() })
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

    /// Removes job result directories whose files are older than `retention` (by the newest of
    /// them); returns how long until the oldest one left is due.
    pub fn remove_old_results(&self, retention: Duration) -> io::Result<Option<Duration>> {
        let mut next_due: Option<Duration> = None;
        for project in std::fs::read_dir(&*self.root)? {
            let Ok(jobs) = std::fs::read_dir(project?.path().join(OUTPUTS_DIR)) else { continue };
            for job in jobs {
                let dir = job?.path();
                let published =
                    Format::ALL.into_iter().filter_map(|format| std::fs::metadata(dir.join(JobFile::Mix(format).file_name())).and_then(|m| m.modified()).ok());
                let Some(modified) = published.max() else { continue };
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
    fn project_directories_never_differ_only_in_case_and_name_one_id_each() {
        let ids = ["pa", "pA", "PA", "Pa", "p-a_9", "Mix-2024_B"];
        let names: Vec<String> = ids.iter().map(|id| project_dir_name(&id.parse().unwrap())).collect();
        assert_eq!(names, ["pa", "p+a", "+p+a", "+pa", "p-a_9", "+mix-2024_+b"]);
        for (id, name) in ids.iter().zip(&names) {
            assert_eq!(project_of_dir_name(name).unwrap().as_str(), *id, "round trip");
            assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
        }
        let folded: std::collections::HashSet<String> = names.iter().map(|name| name.to_lowercase()).collect();
        assert_eq!(folded.len(), ids.len(), "distinct on a case-insensitive filesystem");
        for other in ["pA", "p+", "p+A", "p+1", ".mixd", "+"] {
            assert_eq!(project_of_dir_name(other), None, "{other}");
        }
    }

    #[test]
    fn the_media_route_reaches_results_and_stems_only() {
        let layout = MediaLayout::new("/data");
        let project: ProjectId = "p1".parse().unwrap();
        let (job, stem) = (JobId::new(), StemId::new());
        let file = |path: &str| MediaLayout::media_name(path).map(|name| (name.is_immutable(), name));
        for format in Format::ALL {
            let name = format!("p1/mix_outputs/{job}/final_mix.{}", format.extension());
            assert_eq!(file(&name), Some((true, MediaName::Result { project: project.clone(), job_id: job, file: JobFile::Mix(format) })));
            assert_eq!(MediaLayout::result_url(&project, job, format), format!("/media/{name}"));
        }
        assert_eq!(
            file(&format!("p1/mix_outputs/{job}/analysis.json")),
            Some((true, MediaName::Result { project: project.clone(), job_id: job, file: JobFile::Analysis }))
        );
        assert_eq!(file("p1/mix_outputs/final_mix.wav"), Some((false, MediaName::Newest { project: project.clone() })));
        assert_eq!(file(&format!("p1/stems/{stem}.flac")), Some((true, MediaName::Stem { project: project.clone(), stem_id: stem, format: "flac".into() })));
        let temporary = layout.result_temporary(&project, job, 1, JobFile::Mix(Format::Opus));
        let temporary_name = temporary.file_name().unwrap().to_string_lossy();
        let staged = layout.result_staged(&project, job, 1, JobFile::Mix(Format::Flac));
        let staged_name = staged.file_name().unwrap().to_string_lossy();
        for refused in [
            format!("p1/stems/{stem}.json"),
            format!("p1/mix_outputs/{job}/{temporary_name}"),
            format!("p1/mix_outputs/{job}/{staged_name}"),
            format!("p1/mix_outputs/{job}/final_mix.WAV"),
            format!("p1/mix_outputs/{job}/final_mix.ogg"),
            format!("p1/mix_outputs/{job}/other.mp3"),
            "p1/mix_outputs/final_mix.opus".to_string(),
            ".mixd/jobs.sqlite3".to_string(),
            "../etc/passwd".to_string(),
            "p1/mix_outputs/not-a-uuid/final_mix.wav".to_string(),
            format!("p 1/mix_outputs/{job}/final_mix.wav"),
            format!("p1/stems/{stem}.wav/x"),
            "p1/stems".to_string(),
            String::new(),
        ] {
            assert_eq!(MediaLayout::media_name(&refused), None, "{refused}");
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
            layout.result_temporary(&project, job, 1, JobFile::Mix(Format::Wav)),
            layout.result_staged(&project, job, 2, JobFile::Mix(Format::Mp3)),
            layout.result_staged(&project, job, 2, JobFile::Analysis),
        ];
        let kept = [
            record,
            layout.result(&project, job, JobFile::Mix(Format::Wav)),
            layout.result(&project, job, JobFile::Mix(Format::Opus)),
            layout.result(&project, job, JobFile::Analysis),
        ];
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
        // A job delivered as Opus alone is kept and removed by its Opus file's age.
        let (wav, opus) = (JobFile::Mix(Format::Wav), JobFile::Mix(Format::Opus));
        for (job, file) in [(old, wav), (old, opus), (fresh, opus)] {
            std::fs::create_dir_all(layout.job_outputs(&project, job)).unwrap();
            std::fs::write(layout.result(&project, job, file), b"RIFF").unwrap();
        }
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for file in [wav, opus] {
            std::fs::File::options().write(true).open(layout.result(&project, old, file)).unwrap().set_modified(an_hour_ago).unwrap();
        }

        let next = layout.remove_old_results(Duration::from_secs(1800)).unwrap().unwrap();
        assert!(!layout.job_outputs(&project, old).exists());
        assert!(layout.result(&project, fresh, opus).exists());
        assert!(next > Duration::from_secs(1790) && next <= Duration::from_secs(1800), "{next:?}");
    }
}
