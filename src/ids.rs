//! The identifiers and the time stamp that job state and media storage both use. They validate
//! when parsed, with a typed error naming which id was bad, so bad data stops at the edge.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;
use uuid::Uuid;

/// Which id failed to parse. A malformed job or stem id answers like an unknown one (404), a
/// malformed project id with 400: the API maps each variant directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("invalid project id")]
    Project,
    #[error("invalid job id")]
    Job,
    #[error("invalid stem id")]
    Stem,
}

/// 1-64 chars of `A-Z a-z 0-9 _ -`, first alphanumeric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
#[schema(value_type = String, pattern = "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", example = "p1")]
pub struct ProjectId(String);

impl FromStr for ProjectId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        let valid =
            (1..=64).contains(&s.len()) && s.starts_with(|c: char| c.is_ascii_alphanumeric()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if valid {
            Ok(Self(s.to_string()))
        } else {
            Err(InvalidId::Project)
        }
    }
}

impl<'de> Deserialize<'de> for ProjectId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

impl ProjectId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! uuid_id {
    ($name:ident, $doc:literal, $invalid:expr) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
        #[schema(value_type = String, format = Uuid, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$")]
        pub struct $name(Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            pub fn as_uuid(self) -> Uuid {
                self.0
            }

            pub fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                match Uuid::try_parse(s) {
                    Ok(uuid) if uuid.get_version_num() == 4 => Ok(Self(uuid)),
                    _ => Err($invalid),
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(JobId, "A mix job's id: a UUID v4.", InvalidId::Job);
uuid_id!(StemId, "A stem's id: a UUID v4.", InvalidId::Stem);

/// RFC 3339 UTC with microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ToSchema, Deserialize)]
#[schema(value_type = String, format = DateTime, example = "2026-11-29T10:00:00.000000Z")]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// Now, to the microsecond: what the wire and the database carry, so a restored status
    /// equals the one that was stored.
    pub fn now() -> Self {
        Self(Utc::now().trunc_subsecs(6))
    }

    /// Time since this moment; zero if it lies in the future (the clock was set back).
    pub fn elapsed(self) -> std::time::Duration {
        (Utc::now() - self.0).to_std().unwrap_or_default()
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_rfc3339_opts(SecondsFormat::Micros, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_validate_when_parsed() {
        assert!("p1".parse::<ProjectId>().is_ok());
        assert!("My_Song-2".parse::<ProjectId>().is_ok());
        assert!("a".repeat(64).parse::<ProjectId>().is_ok());
        for bad in ["", "-p", "_p", "p 1", "p/1", "..", "p.1", &"a".repeat(65), "é"] {
            assert!(bad.parse::<ProjectId>().is_err(), "{bad:?}");
        }
        let id = JobId::new().to_string();
        assert_eq!(id.parse::<JobId>().unwrap().to_string(), id);
        assert!("not-a-uuid".parse::<JobId>().is_err());
        // A valid UUID of another version is not a job id.
        assert!("6ba7b810-9dad-11d1-80b4-00c04fd430c8".parse::<JobId>().is_err());
    }

    #[test]
    fn ids_say_which_id_was_bad() {
        assert_eq!("p 1".parse::<ProjectId>(), Err(InvalidId::Project));
        assert_eq!("x".parse::<JobId>(), Err(InvalidId::Job));
        assert_eq!("x".parse::<StemId>(), Err(InvalidId::Stem));
    }
}
