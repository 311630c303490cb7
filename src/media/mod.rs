//! Where the bytes of stems and mixes live: the local data root, or S3-compatible object storage
//! with a bounded local cache in front of it. It knows ids and audio types, never jobs.
//!
//! - [`storage`]: [`Media`], the one decision of where media live, with every operation that
//!   differs between the data root and object storage;
//! - [`layout`]: every path under the data root, every object key, the result URL;
//! - [`stems`]: a project's stems, each a file with a record beside it;
//! - [`objects`] and [`cache`]: object storage, and the local cache mixes read stems through;
//! - [`sweep`]: output retention and, on object storage, orphaned audio;
//! - [`error`]: what can go wrong there.

mod cache;
mod error;
mod layout;
mod objects;
mod stems;
mod storage;
mod sweep;

pub use cache::{CachedFile, StemCache};
pub use error::MediaError;
pub use layout::{keys, JobFile, MediaLayout, MediaName};
pub use objects::{ObjectInfo, ObjectKey, ObjectMedia, StorageUrl};
pub use stems::{sanitize_file_name, Stem, StemStore};
pub use storage::{Media, MediaFile, Opened};
pub use sweep::remove_old_outputs;
