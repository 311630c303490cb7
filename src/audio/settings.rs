//! Mix settings as the contract spells them, and the one place they are validated and the output
//! rate is decided: [`MixSettings::validate`], which gives [`ValidSettings`].
//!
//! Everything is optional on the wire; `Default` gives the contract's defaults. Values out of range
//! are rejected with the offending field named, never clamped, so a client learns what it sent wrong.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::StemSource;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MixSettings {
    /// Per-track settings keyed by stem id or by the stem's file name.
    pub tracks: BTreeMap<String, TrackSettings>,
    pub align: AlignMode,
    pub auto: AutoSettings,
    pub master: MasterSettings,
    pub output: OutputSettings,
}

/// What mixd decides for the user.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AutoSettings {
    /// Brings every audible stem to a common loudness (BS.1770, gated) before its `gain_db`,
    /// offset by its `level_lu`.
    pub balance: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrackSettings {
    pub gain_db: f64,
    /// -1 (hard left) ..= 1 (hard right), constant-power with -3 dB at the centre.
    pub pan: f64,
    pub mute: bool,
    pub solo: bool,
    /// Positive delays the track, negative starts it earlier.
    pub offset_ms: f64,
    pub eq: Vec<EqBand>,
    pub compressor: Option<CompressorSettings>,
    /// With `auto.balance`: where this stem sits against the common level, in LU (-6 puts it 6
    /// LU under the others).
    #[schema(minimum = -40, maximum = 40)]
    pub level_lu: f64,
}

impl Default for TrackSettings {
    fn default() -> Self {
        Self { gain_db: 0.0, pan: 0.0, mute: false, solo: false, offset_ms: 0.0, eq: Vec::new(), compressor: None, level_lu: 0.0 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlignMode {
    #[default]
    None,
    /// Estimate each stem's offset against the first stem by cross-correlation.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EqType {
    Highpass,
    Lowpass,
    Lowshelf,
    Highshelf,
    Peak,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EqBand {
    #[serde(rename = "type")]
    pub kind: EqType,
    pub freq_hz: f64,
    #[serde(default = "default_q")]
    pub q: f64,
    /// Used by shelves and peaks; ignored by the pass filters.
    #[serde(default)]
    pub gain_db: f64,
}

fn default_q() -> f64 {
    std::f64::consts::FRAC_1_SQRT_2
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CompressorSettings {
    pub threshold_db: f64,
    pub ratio: f64,
    pub attack_ms: f64,
    pub release_ms: f64,
    pub makeup_db: f64,
}

impl Default for CompressorSettings {
    fn default() -> Self {
        Self { threshold_db: -18.0, ratio: 3.0, attack_ms: 10.0, release_ms: 120.0, makeup_db: 0.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MasterSettings {
    /// Default -14, or with a `reference` its loudness; given, it wins over the reference's.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = -70, maximum = -5)]
    pub target_lufs: Option<f64>,
    pub true_peak_dbtp: f64,
    pub eq: Vec<EqBand>,
    pub compressor: Option<CompressorSettings>,
    /// A stem (id or file name) that no track plays, whose loudness, tonal balance and stereo
    /// width the master matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reference: Option<String>,
}

/// The loudness a master aims at when neither a target nor a reference says otherwise.
pub const DEFAULT_TARGET_LUFS: f64 = -14.0;

impl Default for MasterSettings {
    fn default() -> Self {
        Self { target_lufs: None, true_peak_dbtp: -1.0, eq: Vec::new(), compressor: None, reference: None }
    }
}

impl MasterSettings {
    /// The loudness aimed at without a reference.
    pub fn target(&self) -> f64 {
        self.target_lufs.unwrap_or(DEFAULT_TARGET_LUFS)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSettings {
    /// None: the highest stem rate.
    pub sample_rate: Option<u32>,
    /// Of the WAV and the FLAC; 32 is float, which FLAC cannot hold.
    pub bit_depth: BitDepth,
    /// The files to deliver, in this order (`results` keeps it). Each format at most once.
    #[schema(min_items = 1, max_items = 4)]
    pub formats: Vec<FormatSettings>,
}

impl Default for OutputSettings {
    fn default() -> Self {
        Self { sample_rate: None, bit_depth: BitDepth::Int24, formats: vec![FormatSettings::new(Format::Wav), FormatSettings::new(Format::Opus)] }
    }
}

/// A file format a mix is delivered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Wav,
    Flac,
    Mp3,
    Opus,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::Wav, Format::Flac, Format::Mp3, Format::Opus];

    /// The file name extension, which is also the format's name on the wire.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Wav => "wav",
            Format::Flac => "flac",
            Format::Mp3 => "mp3",
            Format::Opus => "opus",
        }
    }

    pub fn from_extension(extension: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|format| format.extension().eq_ignore_ascii_case(extension))
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Wav => "audio/wav",
            Format::Flac => "audio/flac",
            Format::Mp3 => "audio/mpeg",
            Format::Opus => "audio/ogg; codecs=opus",
        }
    }

    pub fn is_lossy(self) -> bool {
        matches!(self, Format::Mp3 | Format::Opus)
    }

    /// The bitrates a format takes (kbps) and its default; `None` for the lossless ones.
    fn bitrates(self) -> Option<(u32, u32, u32)> {
        match self {
            Format::Mp3 => Some((96, 320, 320)),
            Format::Opus => Some((64, 256, 160)),
            Format::Wav | Format::Flac => None,
        }
    }
}

/// The bitrates an MP3 frame header can say (MPEG-1 layer III) within the range the contract allows.
pub const MP3_BITRATES: [u32; 8] = [96, 112, 128, 160, 192, 224, 256, 320];

/// One file to deliver. `bitrate_kbps` is for the lossy formats only: mp3 96-320 (a layer III
/// bitrate, CBR; default 320), opus 64-256 (default 160).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FormatSettings {
    pub format: Format,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 64, maximum = 320)]
    pub bitrate_kbps: Option<u32>,
}

impl FormatSettings {
    pub fn new(format: Format) -> Self {
        Self { format, bitrate_kbps: None }
    }

    /// The bitrate in kbps (the default where none was given); `None` for lossless formats.
    pub fn bitrate(&self) -> Option<u32> {
        let (_, _, default) = self.format.bitrates()?;
        Some(self.bitrate_kbps.unwrap_or(default))
    }
}

/// 16-bit output is TPDF-dithered; 32 is IEEE float. On the wire it is the number of bits, and
/// the discriminants say so to the schema too (an integer enum, not the variant names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "u16", into = "u16")]
#[repr(u16)]
pub enum BitDepth {
    Int16 = 16,
    #[default]
    Int24 = 24,
    Float32 = 32,
}

impl BitDepth {
    pub fn bits(self) -> u16 {
        self as u16
    }
}

impl TryFrom<u16> for BitDepth {
    type Error = String;
    fn try_from(bits: u16) -> Result<Self, Self::Error> {
        match bits {
            16 => Ok(BitDepth::Int16),
            24 => Ok(BitDepth::Int24),
            32 => Ok(BitDepth::Float32),
            other => Err(format!("bit depth {other} is not one of 16, 24, 32")),
        }
    }
}

impl From<BitDepth> for u16 {
    fn from(depth: BitDepth) -> u16 {
        depth.bits()
    }
}

/// A setting that cannot be used, with the JSON path of the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SettingsError {
    pub field: String,
    pub reason: String,
}

impl SettingsError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

/// How close to Nyquist a band may sit: an RBJ biquad degenerates at Nyquist itself.
const NYQUIST_MARGIN: f64 = 0.99;
pub const MIN_OUTPUT_RATE: u32 = 8_000;
pub const MAX_OUTPUT_RATE: u32 = 384_000;

/// Settings that passed [`MixSettings::validate`], with the output rate they were checked for.
/// Only `validate` makes them, so what holds them (the engine, a queued job) need not check
/// again. Deserialising trusts its source: the job store, which writes only these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidSettings {
    settings: MixSettings,
    output_rate: u32,
}

impl ValidSettings {
    pub fn settings(&self) -> &MixSettings {
        &self.settings
    }

    /// The rate the mix is made at; every EQ band lies below its Nyquist frequency.
    pub fn output_rate(&self) -> u32 {
        self.output_rate
    }

    /// How long the mix of `stems` (each with its length in seconds) lasts before alignment:
    /// until the latest-ending stem ends, muted ones too, each moved by its `offset_ms` (a
    /// negative one cuts its start), as the engine lays the tracks out. A reference is not played
    /// and sets no length.
    pub fn length_s<'a>(&self, stems: impl IntoIterator<Item = (&'a StemSource, f64)>) -> f64 {
        stems
            .into_iter()
            .filter(|(stem, _)| !self.settings.is_reference(stem))
            .map(|(stem, seconds)| (seconds + self.settings.track_for(stem).offset_ms / 1000.0).max(0.0))
            .fold(0.0, f64::max)
    }
}

impl MixSettings {
    /// Parses settings from JSON, naming the field at fault on failure (`tracks.bass.eq[0].type`).
    pub fn from_json(bytes: &[u8]) -> Result<Self, SettingsError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let path = err.path().to_string();
            let field = if path == "." { "body".to_string() } else { path };
            SettingsError::new(field, err.into_inner().to_string())
        })
    }

    /// Checks these settings once, for the mix of `stems` whose highest rate is
    /// `highest_stem_rate`: every value against its allowed range, every track key against the
    /// stems, and every EQ band against the Nyquist frequency of the output rate, which is decided
    /// here and only here (`output.sample_rate`, or else the highest stem rate).
    pub fn validate(self, stems: &[StemSource], highest_stem_rate: u32) -> Result<ValidSettings, SettingsError> {
        let reference = match &self.master.reference {
            Some(key) => {
                let Some(reference) = stems.iter().find(|s| s.id == *key || s.name == *key) else {
                    return Err(SettingsError::new("master.reference", "no stem has this id or file name"));
                };
                if stems.iter().all(|s| s == reference) {
                    return Err(SettingsError::new("master.reference", "the project has no other stem to mix"));
                }
                Some(reference)
            }
            None => None,
        };
        for (key, track) in &self.tracks {
            let Some(stem) = stems.iter().find(|s| s.id == *key || s.name == *key) else {
                return Err(SettingsError::new(format!("tracks.{key}"), "no stem has this id or file name"));
            };
            if Some(stem) == reference {
                return Err(SettingsError::new(format!("tracks.{key}"), "this stem is master.reference, which no track plays"));
            }
            let at = |field: &str| format!("tracks.{key}.{field}");
            check_range(track.level_lu, -40.0, 40.0, &at("level_lu"))?;
            if track.level_lu != 0.0 && !self.auto.balance {
                return Err(SettingsError::new(at("level_lu"), "applies only with auto.balance"));
            }
            check_range(track.gain_db, -96.0, 48.0, &at("gain_db"))?;
            check_range(track.pan, -1.0, 1.0, &at("pan"))?;
            check_range(track.offset_ms, -600_000.0, 600_000.0, &at("offset_ms"))?;
            validate_eq(&track.eq, &at("eq"))?;
            if let Some(comp) = &track.compressor {
                validate_compressor(comp, &at("compressor"))?;
            }
        }
        if let Some(target) = self.master.target_lufs {
            check_range(target, -70.0, -5.0, "master.target_lufs")?;
        }
        check_range(self.master.true_peak_dbtp, -20.0, 0.0, "master.true_peak_dbtp")?;
        validate_eq(&self.master.eq, "master.eq")?;
        if let Some(comp) = &self.master.compressor {
            validate_compressor(comp, "master.compressor")?;
        }
        if let Some(rate) = self.output.sample_rate {
            if !(MIN_OUTPUT_RATE..=MAX_OUTPUT_RATE).contains(&rate) {
                return Err(SettingsError::new("output.sample_rate", format!("must be between {MIN_OUTPUT_RATE} and {MAX_OUTPUT_RATE} Hz")));
            }
        }
        validate_formats(&self.output)?;
        let output_rate = self.output.sample_rate.unwrap_or(highest_stem_rate);
        let nyquist = f64::from(output_rate) / 2.0;
        let bands = self
            .tracks
            .iter()
            .flat_map(|(key, track)| track.eq.iter().enumerate().map(move |(i, band)| (format!("tracks.{key}.eq[{i}].freq_hz"), band)))
            .chain(self.master.eq.iter().enumerate().map(|(i, band)| (format!("master.eq[{i}].freq_hz"), band)));
        for (field, band) in bands {
            if band.freq_hz >= nyquist * NYQUIST_MARGIN {
                return Err(SettingsError::new(field, format!("{} Hz is at or above Nyquist for {output_rate} Hz output", band.freq_hz)));
            }
        }
        Ok(ValidSettings { settings: self, output_rate })
    }

    /// The settings of the track for this stem: by id first, then by file name.
    pub fn track_for(&self, stem: &StemSource) -> TrackSettings {
        self.tracks.get(&stem.id).or_else(|| self.tracks.get(&stem.name)).cloned().unwrap_or_default()
    }

    /// Whether `stem` is `master.reference`, which no track plays.
    pub fn is_reference(&self, stem: &StemSource) -> bool {
        self.master.reference.as_ref().is_some_and(|key| *key == stem.id || *key == stem.name)
    }
}

fn check_range(value: f64, min: f64, max: f64, field: &str) -> Result<(), SettingsError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(SettingsError::new(field, format!("{value} is outside {min}..={max}")))
    }
}

fn validate_eq(bands: &[EqBand], field: &str) -> Result<(), SettingsError> {
    if bands.len() > 32 {
        return Err(SettingsError::new(field, "at most 32 bands"));
    }
    for (i, band) in bands.iter().enumerate() {
        let at = |name: &str| format!("{field}[{i}].{name}");
        // The upper bound is checked per mix against Nyquist; here only what no rate allows.
        check_range(band.freq_hz, 1.0, 192_000.0, &at("freq_hz"))?;
        check_range(band.q, 0.05, 50.0, &at("q"))?;
        check_range(band.gain_db, -48.0, 48.0, &at("gain_db"))?;
    }
    Ok(())
}

fn validate_formats(output: &OutputSettings) -> Result<(), SettingsError> {
    if output.formats.is_empty() {
        return Err(SettingsError::new("output.formats", "at least one format"));
    }
    for (i, settings) in output.formats.iter().enumerate() {
        let at = |name: &str| format!("output.formats[{i}].{name}");
        if output.formats[..i].iter().any(|earlier| earlier.format == settings.format) {
            return Err(SettingsError::new(at("format"), format!("{} is asked for twice", settings.format.extension())));
        }
        match (settings.format.bitrates(), settings.bitrate_kbps) {
            (None, Some(_)) => return Err(SettingsError::new(at("bitrate_kbps"), format!("{} is lossless and takes no bitrate", settings.format.extension()))),
            (Some((min, max, _)), Some(kbps)) if !(min..=max).contains(&kbps) => {
                return Err(SettingsError::new(at("bitrate_kbps"), format!("{kbps} is outside {min}..={max} for {}", settings.format.extension())));
            }
            (Some(_), Some(kbps)) if settings.format == Format::Mp3 && !MP3_BITRATES.contains(&kbps) => {
                return Err(SettingsError::new(at("bitrate_kbps"), format!("{kbps} is not an MP3 bitrate (one of {MP3_BITRATES:?})")));
            }
            _ => {}
        }
        if settings.format == Format::Flac && output.bit_depth == BitDepth::Float32 {
            return Err(SettingsError::new("output.bit_depth", "FLAC holds 16 or 24 bits, not 32-bit float"));
        }
    }
    Ok(())
}

fn validate_compressor(comp: &CompressorSettings, field: &str) -> Result<(), SettingsError> {
    let at = |name: &str| format!("{field}.{name}");
    check_range(comp.threshold_db, -96.0, 0.0, &at("threshold_db"))?;
    check_range(comp.ratio, 1.0, 100.0, &at("ratio"))?;
    check_range(comp.attack_ms, 0.0, 1_000.0, &at("attack_ms"))?;
    check_range(comp.release_ms, 1.0, 10_000.0, &at("release_ms"))?;
    check_range(comp.makeup_db, -24.0, 48.0, &at("makeup_db"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stems() -> Vec<StemSource> {
        vec![StemSource { id: "a1".into(), name: "drums.wav".into(), path: "/nonexistent".into() }]
    }

    #[test]
    fn empty_body_means_defaults() {
        let settings = MixSettings::from_json(b"").unwrap();
        assert_eq!(settings, MixSettings::default());
        assert_eq!((settings.master.target_lufs, settings.master.target()), (None, -14.0));
        assert_eq!((settings.auto.balance, settings.master.reference), (false, None));
        assert_eq!(settings.output.bit_depth, BitDepth::Int24);
        assert_eq!(settings.output.formats, [FormatSettings { format: Format::Wav, bitrate_kbps: None }, FormatSettings { format: Format::Opus, bitrate_kbps: None }]);
        assert_eq!(settings.output.formats[1].bitrate(), Some(160));
        assert_eq!(FormatSettings::new(Format::Mp3).bitrate(), Some(320));
        assert_eq!(MixSettings::from_json(b"{}").unwrap(), MixSettings::default());
    }

    #[test]
    fn full_contract_example_parses() {
        let json = br#"{ "tracks": { "drums.wav": { "gain_db": 0, "pan": 0.0, "mute": false, "solo": false,
            "offset_ms": 0, "eq": [{"type": "highpass", "freq_hz": 80, "q": 0.7}],
            "compressor": {"threshold_db": -18, "ratio": 3, "attack_ms": 10, "release_ms": 120, "makeup_db": 0} } },
            "align": "none",
            "master": { "target_lufs": -14.0, "true_peak_dbtp": -1.0, "eq": [], "compressor": null },
            "output": { "sample_rate": null, "bit_depth": 24 } }"#;
        let settings = MixSettings::from_json(json).unwrap().validate(&stems(), 48_000).unwrap();
        assert_eq!(settings.settings().tracks["drums.wav"].eq[0].kind, EqType::Highpass);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&[u8], &str); 16] = [
            (br#"{"output": {"formats": []}}"#, "output.formats"),
            (br#"{"output": {"formats": [{"format": "aac"}]}}"#, "output.formats[0].format"),
            (br#"{"output": {"formats": [{"format": "wav"}, {"format": "mp3"}, {"format": "mp3", "bitrate_kbps": 128}]}}"#, "output.formats[2].format"),
            (br#"{"output": {"formats": [{"format": "mp3", "bitrate_kbps": 330}]}}"#, "output.formats[0].bitrate_kbps"),
            (br#"{"output": {"formats": [{"format": "mp3", "bitrate_kbps": 100}]}}"#, "output.formats[0].bitrate_kbps"),
            (br#"{"output": {"formats": [{"format": "opus", "bitrate_kbps": 32}]}}"#, "output.formats[0].bitrate_kbps"),
            (br#"{"output": {"formats": [{"format": "flac", "bitrate_kbps": 900}]}}"#, "output.formats[0].bitrate_kbps"),
            (br#"{"output": {"formats": [{"format": "flac"}], "bit_depth": 32}}"#, "output.bit_depth"),
            (br#"{"tracks": {"a1": {"pan": 1.5}}}"#, "tracks.a1.pan"),
            (br#"{"tracks": {"a1": {"eq": [{"type": "notch", "freq_hz": 100}]}}}"#, "tracks.a1.eq[0].type"),
            (br#"{"tracks": {"a1": {"compressor": {"ratio": 0.5}}}}"#, "tracks.a1.compressor.ratio"),
            (br#"{"tracks": {"a1": {"eq": [{"type": "peak", "freq_hz": -5}]}}}"#, "tracks.a1.eq[0].freq_hz"),
            (br#"{"tracks": {"vocals.wav": {}}}"#, "tracks.vocals.wav"),
            (br#"{"output": {"bit_depth": 20}}"#, "output.bit_depth"),
            (br#"{"master": {"target_lufs": 3}}"#, "master.target_lufs"),
            (br#"{"align": "sideways"}"#, "align"),
        ];
        for (json, field) in cases {
            let err = MixSettings::from_json(json).and_then(|s| s.validate(&stems(), 48_000)).unwrap_err();
            assert_eq!(err.field, field, "{}", String::from_utf8_lossy(json));
        }
    }

    #[test]
    fn eq_bands_must_sit_below_the_nyquist_of_the_output_rate_decided_here() {
        let track = MixSettings::from_json(br#"{"tracks": {"a1": {"eq": [{"type": "peak", "freq_hz": 23000, "gain_db": 3}]}}}"#).unwrap();
        assert_eq!(track.clone().validate(&stems(), 44_100).unwrap_err().field, "tracks.a1.eq[0].freq_hz");
        // Without an output rate the mix is made at the highest stem rate.
        assert_eq!(track.clone().validate(&stems(), 48_000).unwrap().output_rate(), 48_000);
        // An output rate, when given, wins over the stems'.
        let mut at_44k = track;
        at_44k.output.sample_rate = Some(44_100);
        assert_eq!(at_44k.validate(&stems(), 96_000).unwrap_err().field, "tracks.a1.eq[0].freq_hz");
        let master = MixSettings::from_json(br#"{"master": {"eq": [{"type": "highshelf", "freq_hz": 30000}]}, "output": {"sample_rate": 96000}}"#).unwrap();
        assert_eq!(master.clone().validate(&stems(), 44_100).unwrap().output_rate(), 96_000);
        let mut master_at_stem_rate = master;
        master_at_stem_rate.output.sample_rate = None;
        assert_eq!(master_at_stem_rate.validate(&stems(), 44_100).unwrap_err().field, "master.eq[0].freq_hz");
    }

    #[test]
    fn valid_settings_serialise_with_their_output_rate() {
        let settings = MixSettings::from_json(br#"{"master": {"target_lufs": -16}}"#).unwrap();
        let valid = settings.clone().validate(&stems(), 44_100).unwrap();
        let json = serde_json::to_value(&valid).unwrap();
        assert_eq!(json, serde_json::json!({ "settings": serde_json::to_value(&settings).unwrap(), "output_rate": 44_100 }));
        assert_eq!(serde_json::from_value::<ValidSettings>(json).unwrap(), valid);
        // Plain settings are not mistaken for validated ones (the job store tells its rows apart so).
        assert!(serde_json::from_value::<ValidSettings>(serde_json::to_value(&settings).unwrap()).is_err());
    }

    #[test]
    fn a_reference_is_a_stem_no_track_plays_and_level_lu_needs_balance() {
        let two = vec![stems().remove(0), StemSource { id: "b2".into(), name: "ref.flac".into(), path: "/nonexistent".into() }];
        let check = |json: &[u8], on: &[StemSource]| MixSettings::from_json(json).and_then(|s| s.validate(on, 48_000)).map(|_| ()).map_err(|err| (err.field, err.reason));
        let refused = |field: &str, reason: &str| Err((field.to_string(), reason.to_string()));
        assert_eq!(check(br#"{"master": {"reference": "ref.flac"}}"#, &two), Ok(()));
        assert_eq!(check(br#"{"master": {"reference": "b2"}, "tracks": {"drums.wav": {"gain_db": -3}}}"#, &two), Ok(()));
        assert_eq!(
            check(br#"{"master": {"reference": "b2"}, "tracks": {"ref.flac": {}}}"#, &two),
            refused("tracks.ref.flac", "this stem is master.reference, which no track plays")
        );
        assert_eq!(check(br#"{"master": {"reference": "missing.wav"}}"#, &two), refused("master.reference", "no stem has this id or file name"));
        assert_eq!(check(br#"{"master": {"reference": "a1"}}"#, &stems()), refused("master.reference", "the project has no other stem to mix"));
        assert_eq!(check(br#"{"auto": {"balance": true}, "tracks": {"a1": {"level_lu": -6}}}"#, &two), Ok(()));
        assert_eq!(check(br#"{"auto": {"balance": true}, "tracks": {"a1": {"level_lu": -41}}}"#, &two), refused("tracks.a1.level_lu", "-41 is outside -40..=40"));
        assert_eq!(check(br#"{"tracks": {"a1": {"level_lu": -6}}}"#, &two), refused("tracks.a1.level_lu", "applies only with auto.balance"));
        // The reference sets no length: only the stems played do.
        let valid = MixSettings::from_json(br#"{"master": {"reference": "ref.flac"}}"#).unwrap().validate(&two, 48_000).unwrap();
        assert_eq!(valid.length_s([(&two[0], 30.0), (&two[1], 300.0)]), 30.0);
    }

    #[test]
    fn track_lookup_prefers_id_then_name() {
        let settings = MixSettings::from_json(br#"{"tracks": {"drums.wav": {"gain_db": -3}}}"#).unwrap();
        assert_eq!(settings.track_for(&stems()[0]).gain_db, -3.0);
    }
}
