//! Decoding stems with symphonia into stereo f32, one chunk at a time.
//!
//! A [`StemReader`] never holds more than one packet's worth of audio, so a mix streams each stem
//! through the pipeline instead of decoding it whole. Every way a file can be bad ends in a typed
//! [`AudioError`] naming the stem: unknown formats, truncated files (a container that declares more
//! audio than decodes), absurd rates or channel counts, and panics inside a decoder.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use symphonia::core::audio::{Channels, SampleBuffer, SignalSpec};
use symphonia::core::codecs::{Decoder, DecoderOptions, CODEC_TYPE_AAC, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::{FormatOptions, FormatReader};
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::buffer::StereoBuffer;
use super::{AudioError, StemSource};

pub const MIN_RATE: u32 = 8_000;
pub const MAX_RATE: u32 = 384_000;
pub const MAX_CHANNELS: usize = 32;
/// Twelve hours: anything longer is a corrupt header, not a stem.
pub const MAX_DURATION_S: f64 = 12.0 * 3600.0;
/// AAC-LC encoders prime the stream with one frame of silence that symphonia does not trim.
const AAC_PRIMING_FRAMES: u64 = 1024;
/// A stem that takes longer than this to decode is treated as hostile (symphonia has hung on
/// crafted input before): even a 12-hour file decodes in well under this.
pub const MAX_PROBE_TIME: std::time::Duration = std::time::Duration::from_secs(120);
/// A file is truncated when this many declared frames fail to decode (lossy codecs round their
/// declared length to whole packets, so a few are tolerated).
const TRUNCATION_TOLERANCE_FRAMES: u64 = 4096;

/// What a stem is, as far as its container and a full decode say.
#[derive(Debug, Clone, PartialEq)]
pub struct StemInfo {
    /// Container: wav, flac, mp3, ogg, m4a, aac, aiff.
    pub format: String,
    /// Codec short name as symphonia reports it (pcm_s16le, flac, mp3, vorbis, aac, alac...).
    pub codec: String,
    pub sample_rate: u32,
    pub channels: usize,
    /// Frames after priming is trimmed; exact after [`probe_stem`], declared after [`StemReader::open`].
    pub frames: u64,
    /// Damaged packets skipped while the stream still decoded to its end.
    pub skipped_packets: u64,
}

impl StemInfo {
    pub fn duration_s(&self) -> f64 {
        self.frames as f64 / f64::from(self.sample_rate)
    }
}

/// Opens, probes and decodes a stem to its end, returning exact metadata. This is the gate a file
/// must pass before it is kept: it decodes everything so a file corrupt part-way is caught now,
/// not in the middle of somebody's mix.
pub fn probe_stem(path: &Path, name: &str) -> Result<StemInfo, AudioError> {
    let mut reader = StemReader::open(path, name)?;
    let declared = reader.declared_frames;
    let mut chunk = StereoBuffer::default();
    let mut frames = 0u64;
    let started = std::time::Instant::now();
    while reader.next_chunk(&mut chunk)? {
        frames += chunk.len() as u64;
        if started.elapsed() > MAX_PROBE_TIME {
            return Err(AudioError::Decode { stem: name.to_string(), reason: "decoding takes far too long; the file looks malformed".into() });
        }
        if frames as f64 / f64::from(reader.info.sample_rate) > MAX_DURATION_S {
            return Err(AudioError::unsupported(name, "longer than 12 hours"));
        }
    }
    let cut_ogg = reader.container == Container::Ogg && !ogg_ends_cleanly(path).map_err(|source| AudioError::Open { stem: name.to_string(), source })?;
    if cut_ogg {
        let at = frames as f64 / f64::from(reader.info.sample_rate);
        return Err(AudioError::Decode {
            stem: name.to_string(),
            reason: format!("the file is truncated: its Ogg stream has no final page, and decoding stops at {at:.3} s"),
        });
    }
    if let Some(declared) = declared {
        if frames + TRUNCATION_TOLERANCE_FRAMES < declared {
            let at = frames as f64 / f64::from(reader.info.sample_rate);
            return Err(AudioError::Decode {
                stem: name.to_string(),
                reason: format!(
                    "the file is truncated: it declares {:.3} s of audio but decoding stops at {at:.3} s",
                    declared as f64 / f64::from(reader.info.sample_rate)
                ),
            });
        }
    }
    if frames == 0 {
        return Err(AudioError::unsupported(name, "it contains no audio"));
    }
    let mut info = reader.info.clone();
    info.frames = frames;
    Ok(info)
}

/// A stem opened for streaming decode, downmixed to stereo.
pub struct StemReader {
    name: String,
    format: Box<dyn FormatReader>,
    decoder: Box<dyn Decoder>,
    track_id: u32,
    /// Per source channel, its (left, right) downmix coefficients.
    downmix: Vec<(f32, f32)>,
    samples: Option<SampleBuffer<f32>>,
    frames_to_skip: u64,
    declared_frames: Option<u64>,
    decoded_frames: u64,
    container: Container,
    pub info: StemInfo,
}

impl StemReader {
    pub fn open(path: &Path, name: &str) -> Result<Self, AudioError> {
        contain_panic(name, || Self::open_inner(path, name, None))
    }

    /// `channels` fills in what the container does not declare (symphonia 0.5 reads an MP4's
    /// channel count only inside the AAC decoder), learned by decoding the first packet.
    fn open_inner(path: &Path, name: &str, channels: Option<Channels>) -> Result<Self, AudioError> {
        let mut file = File::open(path).map_err(|source| AudioError::Open { stem: name.to_string(), source })?;
        let mut magic = [0u8; 16];
        let magic_len = read_up_to(&mut file, &mut magic).map_err(|source| AudioError::Open { stem: name.to_string(), source })?;
        let container = sniff_container(&magic[..magic_len]).map_err(|reason| AudioError::unsupported(name, reason))?;
        drop(file);

        let file = File::open(path).map_err(|source| AudioError::Open { stem: name.to_string(), source })?;
        let source: Box<dyn MediaSource> = if container == Container::Rf64 {
            Box::new(Rf64AsRiff::open(file).map_err(|reason| AudioError::unsupported(name, reason))?)
        } else {
            Box::new(file)
        };
        let stream = MediaSourceStream::new(source, Default::default());
        let mut hint = Hint::new();
        hint.with_extension(container.extension());
        let format_options = FormatOptions { enable_gapless: true, ..Default::default() };
        let probed = symphonia::default::get_probe()
            .format(&hint, stream, &format_options, &MetadataOptions::default())
            .map_err(|err| AudioError::unsupported(name, describe(&err)))?;
        let format = probed.format;
        let track = format
            .tracks()
            .iter()
            .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
            .ok_or_else(|| AudioError::unsupported(name, "it has no audio track"))?;
        let mut params = track.codec_params.clone();
        let track_id = track.id;
        if params.channels.is_none() {
            params.channels = channels.or_else(|| params.channel_layout.map(|l| l.into_channels()));
        }

        let sample_rate = params.sample_rate.ok_or_else(|| AudioError::unsupported(name, "no sample rate"))?;
        if !(MIN_RATE..=MAX_RATE).contains(&sample_rate) {
            return Err(AudioError::unsupported(name, format!("sample rate {sample_rate} Hz is outside 8-384 kHz")));
        }
        let mut decoder = symphonia::default::get_codecs()
            .make(&params, &DecoderOptions::default())
            .map_err(|err| AudioError::unsupported(name, describe(&err)))?;
        if params.channels.is_none() {
            let mut format = format;
            let learned = first_decoded_channels(format.as_mut(), decoder.as_mut(), track_id)
                .ok_or_else(|| AudioError::unsupported(name, "no packet decodes, so the channel count is unknown"))?;
            return Self::open_inner(path, name, Some(learned));
        }
        let channels = params.channels.map(|c| c.count()).unwrap_or(0);
        if !(1..=MAX_CHANNELS).contains(&channels) {
            return Err(AudioError::unsupported(name, format!("{channels} channels is outside 1-32")));
        }
        let codec = symphonia::default::get_codecs()
            .get_codec(params.codec)
            .map(|d| d.short_name.to_string())
            .unwrap_or_else(|| "unknown".to_string());

        let frames_to_skip = if params.codec == CODEC_TYPE_AAC { u64::from(params.delay.unwrap_or(AAC_PRIMING_FRAMES as u32)) } else { 0 };
        let declared_frames = params.n_frames;
        if let Some(declared) = declared_frames {
            if declared as f64 / f64::from(sample_rate) > MAX_DURATION_S {
                return Err(AudioError::unsupported(name, format!("the header declares {declared} frames, longer than 12 hours")));
            }
        }
        let downmix = downmix_coefficients(params.channels.unwrap_or(Channels::empty()), channels);
        let info = StemInfo {
            format: container.extension().to_string(),
            codec,
            sample_rate,
            channels,
            frames: declared_frames.unwrap_or(0).saturating_sub(frames_to_skip),
            skipped_packets: 0,
        };
        Ok(Self {
            name: name.to_string(),
            format,
            decoder,
            track_id,
            downmix,
            samples: None,
            frames_to_skip,
            declared_frames,
            decoded_frames: 0,
            container,
            info,
        })
    }

    pub fn source(stem: &StemSource) -> Result<Self, AudioError> {
        Self::open(&stem.path, &stem.name)
    }

    /// Replaces `chunk` with the next decoded audio. Returns false at the end of the stream.
    pub fn next_chunk(&mut self, chunk: &mut StereoBuffer) -> Result<bool, AudioError> {
        let name = self.name.clone();
        contain_panic(&name, || self.next_chunk_inner(chunk))
    }

    fn next_chunk_inner(&mut self, chunk: &mut StereoBuffer) -> Result<bool, AudioError> {
        chunk.clear();
        loop {
            let packet = match self.format.next_packet() {
                Ok(packet) => packet,
                // symphonia 0.5 signals the end of a stream as an unexpected EOF; a file cut short
                // looks the same, which `probe_stem` catches by comparing with the declared length.
                Err(SymphoniaError::IoError(err)) if err.kind() == ErrorKind::UnexpectedEof => return Ok(false),
                Err(err) => return Err(self.decode_error(&err)),
            };
            if packet.track_id() != self.track_id {
                continue;
            }
            let decoded = match self.decoder.decode(&packet) {
                Ok(decoded) => decoded,
                Err(SymphoniaError::DecodeError(_)) => {
                    // An isolated damaged packet in a lossy stream: skip it, and say so in the metadata.
                    self.info.skipped_packets += 1;
                    if self.info.skipped_packets > 64 {
                        return Err(self.decode_error(&SymphoniaError::DecodeError("too many damaged packets")));
                    }
                    continue;
                }
                Err(err) => return Err(self.decode_error(&err)),
            };
            let frames = decoded.frames();
            if frames == 0 {
                continue;
            }
            self.decoded_frames += frames as u64;
            let spec: SignalSpec = *decoded.spec();
            if spec.channels.count() != self.downmix.len() {
                return Err(AudioError::Decode {
                    stem: self.name.clone(),
                    reason: "the channel count changes inside the stream".to_string(),
                });
            }
            let needs_new = self.samples.as_ref().is_none_or(|s| s.capacity() < frames * self.downmix.len());
            if needs_new {
                self.samples = Some(SampleBuffer::new(decoded.capacity() as u64, spec));
            }
            let samples = self.samples.as_mut().expect("allocated above");
            samples.copy_planar_ref(decoded);
            let planes = samples.samples();

            let skip = self.frames_to_skip.min(frames as u64) as usize;
            self.frames_to_skip -= skip as u64;
            if skip == frames {
                continue;
            }
            let kept = frames - skip;
            chunk.left.resize(kept, 0.0);
            chunk.right.resize(kept, 0.0);
            for (ch, &(to_left, to_right)) in self.downmix.iter().enumerate() {
                let plane = &planes[ch * frames + skip..(ch + 1) * frames];
                if to_left != 0.0 {
                    chunk.left.iter_mut().zip(plane).for_each(|(out, &x)| *out += to_left * x);
                }
                if to_right != 0.0 {
                    chunk.right.iter_mut().zip(plane).for_each(|(out, &x)| *out += to_right * x);
                }
            }
            if chunk.left.iter().chain(&chunk.right).any(|x| !x.is_finite()) {
                return Err(AudioError::Decode { stem: self.name.clone(), reason: "the decoder produced non-finite samples".into() });
            }
            return Ok(true);
        }
    }

    fn decode_error(&self, err: &SymphoniaError) -> AudioError {
        let at = self.decoded_frames as f64 / f64::from(self.info.sample_rate);
        AudioError::Decode { stem: self.name.clone(), reason: format!("{} (at {at:.3} s)", describe(err)) }
    }
}

/// Whether an Ogg file ends with a whole page flagged end-of-stream. Ogg declares no length up
/// front, so this is how a file cut short is told from a complete one.
fn ogg_ends_cleanly(path: &Path) -> std::io::Result<bool> {
    const MAX_PAGE: u64 = 27 + 255 + 255 * 255;
    let mut file = File::open(path)?;
    let length = file.metadata()?.len();
    let start = length.saturating_sub(MAX_PAGE);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((length - start) as usize);
    file.read_to_end(&mut tail)?;
    let Some(page) = tail.windows(4).rposition(|w| w == b"OggS") else { return Ok(false) };
    let page = &tail[page..];
    if page.len() < 27 {
        return Ok(false);
    }
    let end_of_stream = page[5] & 0x04 != 0;
    let segments = usize::from(page[26]);
    let Some(table) = page.get(27..27 + segments) else { return Ok(false) };
    let body: usize = table.iter().map(|&s| usize::from(s)).sum();
    Ok(end_of_stream && page.len() == 27 + segments + body)
}

fn first_decoded_channels(format: &mut dyn FormatReader, decoder: &mut dyn Decoder, track_id: u32) -> Option<Channels> {
    for _ in 0..64 {
        let packet = format.next_packet().ok()?;
        if packet.track_id() != track_id {
            continue;
        }
        if let Ok(decoded) = decoder.decode(&packet) {
            if decoded.frames() > 0 {
                return Some(decoded.spec().channels);
            }
        }
    }
    None
}

/// An RF64/BW64 file presented as the RIFF WAV it is underneath, which symphonia 0.5 reads: RF64
/// moves the sizes that do not fit 32 bits into a `ds64` chunk and writes 0xFFFFFFFF in their
/// place. The header is copied with the real sizes put back and `ds64` renamed `JUNK` (which WAV
/// readers skip); the audio data is read from the file untouched. Data over 4 GB cannot be put
/// back into 32 bits and is refused (it would also exceed the 12-hour stem limit at most rates).
struct Rf64AsRiff {
    file: File,
    header: Vec<u8>,
    position: u64,
    length: u64,
}

impl Rf64AsRiff {
    const MAX_HEADER: u64 = 1 << 20;

    fn open(mut file: File) -> Result<Self, String> {
        let length = file.metadata().map_err(|e| e.to_string())?.len();
        let mut head = Vec::new();
        (&mut file).take(Self::MAX_HEADER).read_to_end(&mut head).map_err(|e| e.to_string())?;
        let u32_at = |at: usize| head.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        let u64_at = |at: usize| head.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if head.get(12..16) != Some(b"ds64") {
            return Err("an RF64 file without its ds64 chunk".into());
        }
        let (Some(riff_size), Some(data_size)) = (u64_at(20), u64_at(28)) else { return Err("a truncated ds64 chunk".into()) };
        let mut offset = 12usize;
        let data_header = loop {
            let (Some(id), Some(size)) = (head.get(offset..offset + 4), u32_at(offset + 4)) else {
                return Err("no data chunk in the first MiB of the RF64 file".into());
            };
            if id == b"data" {
                break offset;
            }
            offset += 8 + size as usize + (size as usize % 2);
        };
        let data_size = u32::try_from(data_size).map_err(|_| "RF64 audio data over 4 GB is not supported".to_string())?;
        let mut header = head[..data_header + 8].to_vec();
        header[..4].copy_from_slice(b"RIFF");
        header[4..8].copy_from_slice(&u32::try_from(riff_size).unwrap_or(u32::MAX).to_le_bytes());
        header[12..16].copy_from_slice(b"JUNK");
        header[data_header + 4..data_header + 8].copy_from_slice(&data_size.to_le_bytes());
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        Ok(Self { file, header, position: 0, length })
    }
}

impl Read for Rf64AsRiff {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let header_len = self.header.len() as u64;
        let read = if self.position < header_len {
            let start = self.position as usize;
            let count = buf.len().min(self.header.len() - start);
            buf[..count].copy_from_slice(&self.header[start..start + count]);
            self.file.seek(SeekFrom::Start(self.position + count as u64))?;
            count
        } else {
            self.file.read(buf)?
        };
        self.position += read as u64;
        Ok(read)
    }
}

impl Seek for Rf64AsRiff {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
            SeekFrom::End(delta) => self.length.checked_add_signed(delta),
        }
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "seek before the start"))?;
        self.position = self.file.seek(SeekFrom::Start(target))?;
        Ok(self.position)
    }
}

impl MediaSource for Rf64AsRiff {
    fn is_seekable(&self) -> bool {
        true
    }

    fn byte_len(&self) -> Option<u64> {
        Some(self.length)
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn describe(err: &SymphoniaError) -> String {
    match err {
        SymphoniaError::Unsupported(what) => format!("unsupported {what}"),
        SymphoniaError::DecodeError(what) => format!("malformed stream: {what}"),
        SymphoniaError::IoError(io) if io.kind() == ErrorKind::UnexpectedEof => "the file ends unexpectedly".to_string(),
        SymphoniaError::IoError(io) => format!("read error: {io}"),
        SymphoniaError::SeekError(_) => "seek error".to_string(),
        SymphoniaError::LimitError(what) => format!("limit exceeded: {what}"),
        SymphoniaError::ResetRequired => "the stream changes parameters mid-way".to_string(),
    }
}

/// Runs decoder code so that a panic inside symphonia ends as a typed error for this stem.
fn contain_panic<T>(stem: &str, f: impl FnOnce() -> Result<T, AudioError>) -> Result<T, AudioError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(AudioError::Decode { stem: stem.to_string(), reason: format!("the decoder crashed: {what}") })
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Wav,
    /// RF64/BW64: WAV with 64-bit sizes, read through [`Rf64AsRiff`].
    Rf64,
    Flac,
    Mp3,
    Ogg,
    Mp4,
    Adts,
    Aiff,
}

impl Container {
    fn extension(self) -> &'static str {
        match self {
            Container::Wav | Container::Rf64 => "wav",
            Container::Flac => "flac",
            Container::Mp3 => "mp3",
            Container::Ogg => "ogg",
            Container::Mp4 => "m4a",
            Container::Adts => "aac",
            Container::Aiff => "aiff",
        }
    }
}

/// Tells the container from the file's first bytes, so a renamed file is judged by what it is,
/// and WAV variants symphonia cannot read are refused by name.
fn sniff_container(magic: &[u8]) -> Result<Container, String> {
    let starts = |prefix: &[u8]| magic.starts_with(prefix);
    let at = |offset: usize, tag: &[u8]| magic.len() >= offset + tag.len() && &magic[offset..offset + tag.len()] == tag;
    if magic.is_empty() {
        return Err("the file is empty".into());
    }
    if starts(b"RIFF") && at(8, b"WAVE") {
        return Ok(Container::Wav);
    }
    if (starts(b"RF64") || starts(b"BW64")) && at(8, b"WAVE") {
        return Ok(Container::Rf64);
    }
    if starts(b"RIFX") {
        return Err("big-endian WAV (RIFX) is not supported".into());
    }
    if starts(b"fLaC") {
        return Ok(Container::Flac);
    }
    if starts(b"OggS") {
        return Ok(Container::Ogg);
    }
    if at(4, b"ftyp") {
        return Ok(Container::Mp4);
    }
    if starts(b"FORM") && (at(8, b"AIFF") || at(8, b"AIFC")) {
        return Ok(Container::Aiff);
    }
    if starts(b"ID3") {
        return Ok(Container::Mp3);
    }
    if magic.len() >= 2 && magic[0] == 0xFF {
        // ADTS sync words have layer bits 00; MPEG audio layer III has 01.
        if magic[1] & 0xF6 == 0xF0 {
            return Ok(Container::Adts);
        }
        if magic[1] & 0xE0 == 0xE0 {
            return Ok(Container::Mp3);
        }
    }
    Err("not a recognised audio file (WAV, FLAC, MP3, OGG Vorbis, AAC/M4A, ALAC, AIFF)".into())
}

/// Standard (ITU-R BS.775) downmix coefficients per source channel; LFE is dropped.
fn downmix_coefficients(layout: Channels, count: usize) -> Vec<(f32, f32)> {
    const MINUS_3DB: f32 = std::f32::consts::FRAC_1_SQRT_2;
    match count {
        1 => return vec![(1.0, 1.0)],
        2 => return vec![(1.0, 0.0), (0.0, 1.0)],
        _ => {}
    }
    let positions: Vec<Channels> = layout.iter().collect();
    if positions.len() != count {
        // No usable layout: alternate left and right, scaled so the sum keeps its level.
        let scale = 2.0 / count as f32;
        return (0..count).map(|i| if i % 2 == 0 { (scale, 0.0) } else { (0.0, scale) }).collect();
    }
    let coefficients: Vec<(f32, f32)> = positions
        .iter()
        .map(|&position| match position {
            Channels::FRONT_LEFT | Channels::FRONT_LEFT_CENTRE | Channels::FRONT_LEFT_WIDE | Channels::FRONT_LEFT_HIGH => (1.0, 0.0),
            Channels::FRONT_RIGHT | Channels::FRONT_RIGHT_CENTRE | Channels::FRONT_RIGHT_WIDE | Channels::FRONT_RIGHT_HIGH => (0.0, 1.0),
            Channels::FRONT_CENTRE | Channels::TOP_FRONT_CENTRE | Channels::TOP_CENTRE => (MINUS_3DB, MINUS_3DB),
            Channels::REAR_CENTRE | Channels::TOP_REAR_CENTRE => (0.5, 0.5),
            Channels::LFE1 | Channels::LFE2 => (0.0, 0.0),
            Channels::REAR_LEFT | Channels::SIDE_LEFT | Channels::REAR_LEFT_CENTRE | Channels::TOP_FRONT_LEFT | Channels::TOP_REAR_LEFT => (MINUS_3DB, 0.0),
            _ => (0.0, MINUS_3DB),
        })
        .collect();
    // Keep a full-scale signal in every channel from clipping the fold-down.
    let left_sum: f32 = coefficients.iter().map(|c| c.0).sum();
    let right_sum: f32 = coefficients.iter().map(|c| c.1).sum();
    let norm = 1.0 / left_sum.max(right_sum).max(1.0);
    coefficients.into_iter().map(|(l, r)| (l * norm, r * norm)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_names_what_it_refuses() {
        assert_eq!(sniff_container(b"RIFF\0\0\0\0WAVEfmt "), Ok(Container::Wav));
        assert_eq!(sniff_container(b"fLaC\0\0\0\x22"), Ok(Container::Flac));
        assert_eq!(sniff_container(b"\0\0\0\x20ftypM4A "), Ok(Container::Mp4));
        assert_eq!(sniff_container(&[0xFF, 0xF1, 0x50]), Ok(Container::Adts));
        assert_eq!(sniff_container(&[0xFF, 0xFB, 0x90]), Ok(Container::Mp3));
        assert_eq!(sniff_container(b"RF64\xff\xff\xff\xffWAVEds64"), Ok(Container::Rf64));
        assert!(sniff_container(b"RIFX\0\0\0\0WAVE").unwrap_err().contains("big-endian"));
        assert!(sniff_container(b"").unwrap_err().contains("empty"));
        assert!(sniff_container(b"hello, world").unwrap_err().contains("not a recognised"));
        assert!(sniff_container(b"\x89PNG\r\n\x1a\n").is_err());
    }

    #[test]
    fn five_one_folds_down_with_itu_coefficients() {
        let layout = Channels::FRONT_LEFT | Channels::FRONT_RIGHT | Channels::FRONT_CENTRE | Channels::LFE1 | Channels::SIDE_LEFT | Channels::SIDE_RIGHT;
        let coefficients = downmix_coefficients(layout, 6);
        let norm = 1.0 / (2.0 * std::f32::consts::FRAC_1_SQRT_2 + 1.0);
        assert!((coefficients[0].0 - norm).abs() < 1e-6);
        assert!((coefficients[2].0 - std::f32::consts::FRAC_1_SQRT_2 * norm).abs() < 1e-6);
        assert_eq!(coefficients[3], (0.0, 0.0));
        assert_eq!(coefficients[4].1, 0.0);
        assert_eq!(downmix_coefficients(Channels::FRONT_LEFT, 1), vec![(1.0, 1.0)]);
    }
}
