//! A bounded local cache of stems kept on object storage: a mix decodes local files, and the same
//! stems are mixed again and again while a user tweaks settings. Least recently used files go
//! first once the cache is over its cap; a file a running mix holds is never evicted (a single
//! stem larger than the cap is still fetched, and goes once its mix lets it go).
//!
//! Files are named by their object key's last segment (a stem id and its format: unique), written
//! under a temporary name and renamed into place, so a crash leaves only temporary files, which
//! [`StemCache::open`] removes.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::StreamExt;
use object_store::path::Path as Location;
use object_store::ObjectStore;
use tokio::io::AsyncWriteExt;

use super::error::MediaError;

const TEMPORARY_PREFIX: &str = ".fetch-";

#[derive(Debug)]
pub struct StemCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<CacheState>,
    /// Held while a file is moved in or an evicted one removed (on the blocking pool, never by a
    /// reader of `state`), so that a removal decided a moment ago cannot take away the same name
    /// fetched again meanwhile.
    files: Mutex<()>,
}

#[derive(Debug, Default)]
struct CacheState {
    entries: HashMap<String, Entry>,
    total_bytes: u64,
    /// A logical clock: every use takes the next tick, so the least recently used is the lowest.
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    last_used: u64,
    holders: usize,
}

/// A cached file, held for as long as this lives: it is not evicted meanwhile.
#[derive(Debug)]
pub struct CachedFile {
    cache: Arc<StemCache>,
    name: String,
    path: PathBuf,
}

impl CachedFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CachedFile {
    fn drop(&mut self) {
        let victims = {
            let mut state = self.cache.state();
            if let Some(entry) = state.entries.get_mut(&self.name) {
                entry.holders -= 1;
            }
            state.evict(self.cache.max_bytes)
        };
        // A drop cannot wait: the files go on the blocking pool (or here, outside a runtime).
        let cache = self.cache.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || cache.remove_evicted(victims))),
            Err(_) => cache.remove_evicted(victims),
        }
    }
}

impl CacheState {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Takes entries out, least recently used first, until the total fits; returns their names
    /// so that the files are removed after the lock is released.
    fn evict(&mut self, max_bytes: u64) -> Vec<String> {
        let mut victims = Vec::new();
        while self.total_bytes > max_bytes {
            let oldest = self.entries.iter().filter(|(_, entry)| entry.holders == 0).min_by_key(|(_, entry)| entry.last_used).map(|(name, _)| name.clone());
            let Some(name) = oldest else { break };
            let entry = self.entries.remove(&name).expect("just found");
            self.total_bytes -= entry.bytes;
            victims.push(name);
        }
        victims
    }
}

impl StemCache {
    /// Opens the cache in `dir`: what an earlier run left is kept (oldest first in line for
    /// eviction, by modification time), its temporary files are removed.
    pub fn open(dir: PathBuf, max_bytes: u64) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(&dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let metadata = entry.metadata()?;
            if !metadata.is_file() {
                continue;
            }
            if name.starts_with('.') {
                std::fs::remove_file(entry.path())?;
                continue;
            }
            found.push((metadata.modified()?, name, metadata.len()));
        }
        found.sort();
        let mut state = CacheState::default();
        for (_, name, bytes) in found {
            let last_used = state.tick();
            state.total_bytes += bytes;
            state.entries.insert(name, Entry { bytes, last_used, holders: 0 });
        }
        let victims = state.evict(max_bytes);
        let cache = Arc::new(Self { dir, max_bytes, state: Mutex::new(state), files: Mutex::new(()) });
        cache.remove_evicted(victims);
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh temporary name in the cache's directory (the cache's own disk, so a rename moves
    /// a finished file in).
    pub fn temporary(&self) -> PathBuf {
        self.dir.join(format!("{TEMPORARY_PREFIX}{}.partial", uuid::Uuid::new_v4()))
    }

    /// The object at `location`, fetched into the cache unless it is there already.
    pub async fn fetch(self: &Arc<Self>, store: &dyn ObjectStore, location: &Location) -> Result<CachedFile, MediaError> {
        let name = location.filename().unwrap_or_default().to_string();
        if let Some(held) = self.hold(&name) {
            return Ok(held);
        }
        let temporary = self.temporary();
        let fetched = async {
            let mut body = store.get(location).await?.into_stream();
            let mut file = tokio::fs::File::create(&temporary).await?;
            while let Some(chunk) = body.next().await {
                file.write_all(&chunk?).await?;
            }
            file.sync_all().await?;
            Ok::<_, MediaError>(())
        };
        if let Err(err) = fetched.await {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(err);
        }
        Ok(self.adopt(&temporary, name).await?)
    }

    /// Moves a finished file (a stem just uploaded, say) into the cache under `name`, and holds it.
    pub async fn adopt(self: &Arc<Self>, file: &Path, name: String) -> io::Result<CachedFile> {
        let (cache, file, entry_name) = (self.clone(), file.to_path_buf(), name.clone());
        let path = tokio::task::spawn_blocking(move || -> io::Result<PathBuf> {
            let _files = cache.files();
            let bytes = std::fs::metadata(&file)?.len();
            let path = cache.dir.join(&entry_name);
            std::fs::rename(&file, &path)?;
            let victims = {
                let mut state = cache.state();
                let last_used = state.tick();
                // Two mixes may fetch the same stem at once: the second rename replaced the first's
                // file with the same bytes, and both hold the one entry.
                let entry = state.entries.entry(entry_name).or_insert(Entry { bytes: 0, last_used, holders: 0 });
                let previous = std::mem::replace(&mut entry.bytes, bytes);
                entry.holders += 1;
                entry.last_used = last_used;
                state.total_bytes = state.total_bytes - previous + bytes;
                state.evict(cache.max_bytes)
            };
            remove_files(&cache.dir, victims);
            Ok(path)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(CachedFile { cache: self.clone(), name, path })
    }

    fn hold(self: &Arc<Self>, name: &str) -> Option<CachedFile> {
        let mut state = self.state();
        let last_used = state.tick();
        let entry = state.entries.get_mut(name)?;
        entry.holders += 1;
        entry.last_used = last_used;
        Some(CachedFile { cache: self.clone(), name: name.to_string(), path: self.dir.join(name) })
    }

    /// Drops a file whose object was deleted (a stem). A mix reading it keeps its open file; other
    /// nodes' caches let it age out, as a stem id is never reused.
    pub async fn forget(self: &Arc<Self>, name: &str) {
        let removed = {
            let mut state = self.state();
            let entry = state.entries.remove(name);
            if let Some(entry) = &entry {
                state.total_bytes -= entry.bytes;
            }
            entry.is_some()
        };
        if removed {
            let (cache, name) = (self.clone(), name.to_string());
            if let Err(err) = tokio::task::spawn_blocking(move || cache.remove_evicted(vec![name])).await {
                tracing::error!(%err, "removing a forgotten cache file failed");
            }
        }
    }

    /// Bytes the cache holds now.
    pub fn size(&self) -> u64 {
        self.state().total_bytes
    }

    /// The bookkeeping: a panic while it was held (a bug) costs the operation that panicked, not
    /// every later fetch; each change under the lock leaves the counts whole.
    fn state(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn files(&self) -> MutexGuard<'_, ()> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes the files of `names`, taken out of the cache a moment ago, unless a name was
    /// fetched again since (it has an entry once more). Blocking.
    fn remove_evicted(&self, mut names: Vec<String>) {
        let _files = self.files();
        {
            let state = self.state();
            names.retain(|name| !state.entries.contains_key(name));
        }
        remove_files(&self.dir, names);
    }
}

fn remove_files(dir: &Path, names: Vec<String>) {
    for name in names {
        // A mix that had the file open keeps reading it: only the name goes.
        if let Err(err) = std::fs::remove_file(dir.join(&name)) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::warn!(%err, name, "could not remove an evicted cache file");
            }
        }
        tracing::debug!(name, "evicted from the stem cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;
    use object_store::{path::Path as ObjectPath, PutPayload};

    /// A real object store on a temporary directory stands in for the bucket.
    async fn bucket_with(objects: &[(&str, usize)]) -> (tempfile::TempDir, LocalFileSystem) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        for (key, bytes) in objects {
            store.put(&ObjectPath::from(*key), PutPayload::from(vec![7u8; *bytes])).await.unwrap();
        }
        (dir, store)
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn the_least_recently_used_file_not_held_goes_when_the_cap_is_passed() {
        let (_bucket, store) = bucket_with(&[("p/stems/a.wav", 400), ("p/stems/b.wav", 400), ("p/stems/c.wav", 400)]).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = StemCache::open(dir.path().join("cache"), 1000).unwrap();
        let key = |name: &str| ObjectPath::from(format!("p/stems/{name}"));

        let a = cache.fetch(&store, &key("a.wav")).await.unwrap();
        drop(cache.fetch(&store, &key("b.wav")).await.unwrap());
        assert_eq!(std::fs::read(a.path()).unwrap(), vec![7u8; 400]);
        // a is held, so c pushes out b, though b was used after a.
        let c = cache.fetch(&store, &key("c.wav")).await.unwrap();
        assert_eq!(names_in(cache.dir()), ["a.wav", "c.wav"]);
        assert_eq!(cache.size(), 800);
        drop((a, c));
        // Now a is the least recently used: fetching b again evicts it (before it returns).
        drop(cache.fetch(&store, &key("b.wav")).await.unwrap());
        assert_eq!(names_in(cache.dir()), ["b.wav", "c.wav"]);
        // A cached file is served without the bucket: gone from the bucket, still read.
        store.delete(&ObjectPath::from("p/stems/c.wav")).await.unwrap();
        assert_eq!(std::fs::read(cache.fetch(&store, &key("c.wav")).await.unwrap().path()).unwrap().len(), 400);
    }

    #[tokio::test]
    async fn a_file_larger_than_the_cap_is_fetched_held_and_dropped_after_use() {
        let (_bucket, store) = bucket_with(&[("p/stems/big.wav", 5000)]).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = StemCache::open(dir.path().join("cache"), 1000).unwrap();
        let big = cache.fetch(&store, &ObjectPath::from("p/stems/big.wav")).await.unwrap();
        assert_eq!(std::fs::metadata(big.path()).unwrap().len(), 5000);
        drop(big);
        // Dropped on the runtime, the file goes on the blocking pool.
        while !names_in(cache.dir()).is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(cache.size(), 0);
    }

    #[tokio::test]
    async fn a_failed_fetch_leaves_nothing_and_a_reopened_cache_keeps_its_files_but_no_partials() {
        let (_bucket, store) = bucket_with(&[("p/stems/a.wav", 300)]).await;
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let cache = StemCache::open(cache_dir.clone(), 1000).unwrap();
        let missing = cache.fetch(&store, &ObjectPath::from("p/stems/missing.wav")).await.unwrap_err();
        assert!(matches!(missing, MediaError::NotFound), "{missing:?}");
        drop(cache.fetch(&store, &ObjectPath::from("p/stems/a.wav")).await.unwrap());
        std::fs::write(cache_dir.join(".fetch-crashed.partial"), b"half").unwrap();
        assert_eq!(names_in(&cache_dir), [".fetch-crashed.partial", "a.wav"]);

        let reopened = StemCache::open(cache_dir.clone(), 1000).unwrap();
        assert_eq!(names_in(&cache_dir), ["a.wav"]);
        assert_eq!(reopened.size(), 300);
        // And under a smaller cap, what no longer fits goes at once.
        let smaller = StemCache::open(cache_dir.clone(), 100).unwrap();
        assert_eq!(names_in(&cache_dir), Vec::<String>::new());
        assert_eq!(smaller.size(), 0);
    }
}
