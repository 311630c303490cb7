//! Decoding stems with symphonia into stereo f32, one chunk at a time.
//!
//! A [`StemReader`] never holds more than one packet's worth of audio, so a mix streams each stem
//! through the pipeline instead of decoding it whole. Every way a file can be bad ends in a typed
//! [`AudioError`] naming the stem: unknown formats, truncated files (a container that declares more
//! audio than decodes), absurd rates or channel counts, and panics inside a decoder.

use std::fs::File;
use std::io::{ErrorKind, Seek};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use symphonia::core::audio::{Channels, SampleBuffer, SignalSpec};
use symphonia::core::codecs::{CodecParameters, Decoder, DecoderOptions, CODEC_TYPE_AAC, CODEC_TYPE_NULL, CODEC_TYPE_PCM_S16LE, CODEC_TYPE_PCM_S24LE};
use symphonia::core::conv::FromSample;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::{FormatOptions, FormatReader};
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;
use symphonia::core::sample::i24;

use super::buffer::StereoBuffer;
use super::container::{ogg_ends_cleanly, read_up_to, sniff_container, Container, Rf64AsRiff};
use super::downmix::downmix_coefficients;
use super::{panic_message, AudioError, StemSource};

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
    /// 16- or 24-bit little-endian PCM, read from the packet's bytes here (into `planar`, or
    /// plain stereo straight into the chunk):
    /// symphonia's decoder reads it a sample at a time through a closure, 13% of a typical
    /// 8-stem WAV mix's CPU time (`perf record`). The samples go through symphonia's own
    /// conversion, so they are the same either way.
    raw_pcm: Option<RawPcm>,
    planar: Vec<f32>,
    frames_to_skip: u64,
    declared_frames: Option<u64>,
    decoded_frames: u64,
    container: Container,
    pub info: StemInfo,
}

impl StemReader {
    pub fn open(path: &Path, name: &str) -> Result<Self, AudioError> {
        contain_panic(name, || Self::open_inner(path, name))
    }

    fn open_inner(path: &Path, name: &str) -> Result<Self, AudioError> {
        let mut opened = OpenedFormat::open(path, name)?;
        let sample_rate = opened.params.sample_rate.ok_or_else(|| AudioError::unsupported(name, "no sample rate"))?;
        if !(MIN_RATE..=MAX_RATE).contains(&sample_rate) {
            return Err(AudioError::unsupported(name, format!("sample rate {sample_rate} Hz is outside 8-384 kHz")));
        }
        if opened.params.channels.is_none() {
            // symphonia 0.5 reads an MP4's channel count only inside the AAC decoder. Learning it
            // uses up packets, so the file is opened a second time to decode from its start.
            let channels = opened.decode_channels(name)?;
            opened = OpenedFormat::open(path, name)?;
            opened.params.channels = Some(channels);
        }
        let OpenedFormat { container, format, track_id, params } = opened;
        let decoder = make_decoder(&params, name)?;
        let channels = params.channels.map(|c| c.count()).unwrap_or(0);
        if !(1..=MAX_CHANNELS).contains(&channels) {
            return Err(AudioError::unsupported(name, format!("{channels} channels is outside 1-32")));
        }
        let codec = symphonia::default::get_codecs().get_codec(params.codec).map(|d| d.short_name.to_string()).unwrap_or_else(|| "unknown".to_string());

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
        // The coded width as symphonia's PCM decoder takes it: it shifts any narrower one.
        let coded_width = params.bits_per_coded_sample.or(params.bits_per_sample);
        let raw_pcm = match (params.codec, coded_width) {
            (CODEC_TYPE_PCM_S16LE, Some(16)) => Some(RawPcm::S16),
            (CODEC_TYPE_PCM_S24LE, Some(24)) => Some(RawPcm::S24),
            _ => None,
        };
        Ok(Self {
            name: name.to_string(),
            format,
            decoder,
            track_id,
            downmix,
            samples: None,
            raw_pcm,
            planar: Vec::new(),
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
            // Plain stereo PCM straight into the chunk, in one pass (the common WAV stem).
            if let Some(pcm) = self.raw_pcm.filter(|_| self.downmix == PLAIN_STEREO) {
                let frames = pcm.frames(packet.buf(), 2);
                self.decoded_frames += frames as u64;
                let skip = take_priming(&mut self.frames_to_skip, frames);
                if skip == frames {
                    continue;
                }
                pcm.read_stereo(&packet.buf()[skip * 2 * pcm.bytes()..frames * 2 * pcm.bytes()], chunk);
                return Ok(true);
            }
            let (frames, planes) = if let Some(pcm) = self.raw_pcm {
                let frames = pcm.read(packet.buf(), self.downmix.len(), &mut self.planar);
                if frames == 0 {
                    continue;
                }
                (frames, &self.planar[..])
            } else {
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
                let spec: SignalSpec = *decoded.spec();
                if spec.channels.count() != self.downmix.len() {
                    return Err(AudioError::Decode { stem: self.name.clone(), reason: "the channel count changes inside the stream".to_string() });
                }
                let needs_new = self.samples.as_ref().is_none_or(|s| s.capacity() < frames * self.downmix.len());
                if needs_new {
                    self.samples = Some(SampleBuffer::new(decoded.capacity() as u64, spec));
                }
                let samples = self.samples.as_mut().expect("allocated above");
                samples.copy_planar_ref(decoded);
                (frames, samples.samples())
            };
            self.decoded_frames += frames as u64;

            let skip = take_priming(&mut self.frames_to_skip, frames);
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

/// Little-endian integer PCM that mixd reads from a packet's bytes itself.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RawPcm {
    S16,
    S24,
}

/// How many of the next `frames` decoded are priming to drop, of the `left` to drop.
fn take_priming(left: &mut u64, frames: usize) -> usize {
    let skip = (*left).min(frames as u64) as usize;
    *left -= skip as u64;
    skip
}

/// The downmix of a stereo source: each channel to its own side.
const PLAIN_STEREO: [(f32, f32); 2] = [(1.0, 0.0), (0.0, 1.0)];

impl RawPcm {
    fn bytes(self) -> usize {
        match self {
            RawPcm::S16 => 2,
            RawPcm::S24 => 3,
        }
    }

    /// Whole frames of `channels` in a packet's bytes.
    fn frames(self, data: &[u8], channels: usize) -> usize {
        data.len() / (self.bytes() * channels)
    }

    /// Stereo frames' bytes into `chunk`: what [`Self::read`] and the downmix make of them, a
    /// channel being `0.0 + 1.0 * sample` there (which only turns a -0.0 into 0.0, and integer
    /// PCM has none: the sum is kept all the same). Integer samples are always finite.
    fn read_stereo(self, data: &[u8], chunk: &mut StereoBuffer) {
        match self {
            RawPcm::S16 => Self::stereo::<2, 4>(data, chunk, Self::s16),
            RawPcm::S24 => Self::stereo::<3, 6>(data, chunk, Self::s24),
        }
    }

    #[inline(always)]
    fn stereo<const BYTES: usize, const FRAME: usize>(data: &[u8], chunk: &mut StereoBuffer, sample: impl Fn([u8; BYTES]) -> f32) {
        let frames = data.len() / FRAME;
        chunk.left.resize(frames, 0.0);
        chunk.right.resize(frames, 0.0);
        for ((frame, left), right) in data.chunks_exact(FRAME).zip(chunk.left.iter_mut()).zip(chunk.right.iter_mut()) {
            *left = sample(frame[..BYTES].try_into().expect("a sample's bytes")) + 0.0;
            *right = sample(frame[BYTES..].try_into().expect("a sample's bytes")) + 0.0;
        }
    }

    /// The packet's whole frames (as symphonia's decoder reads them) into `planar`, one channel
    /// after another; returns how many.
    fn read(self, data: &[u8], channels: usize, planar: &mut Vec<f32>) -> usize {
        match self {
            RawPcm::S16 => Self::deinterleave::<2>(data, channels, planar, Self::s16),
            RawPcm::S24 => Self::deinterleave::<3>(data, channels, planar, Self::s24),
        }
    }

    /// A sample as symphonia's decoder stores it and its conversion to f32 makes it.
    #[inline(always)]
    fn s16([a, b]: [u8; 2]) -> f32 {
        f32::from_sample(i16::from_le_bytes([a, b]))
    }

    #[inline(always)]
    fn s24([a, b, c]: [u8; 3]) -> f32 {
        f32::from_sample(i24::from(i32::from_le_bytes([0, a, b, c]) >> 8))
    }

    #[inline(always)]
    fn deinterleave<const BYTES: usize>(data: &[u8], channels: usize, planar: &mut Vec<f32>, sample: impl Fn([u8; BYTES]) -> f32) -> usize {
        let frames = data.len() / (BYTES * channels);
        planar.clear();
        planar.resize(frames * channels, 0.0);
        if frames > 0 {
            for (channel, plane) in planar.chunks_exact_mut(frames).enumerate() {
                let samples = data.chunks_exact(BYTES).skip(channel).step_by(channels);
                for (out, bytes) in plane.iter_mut().zip(samples) {
                    *out = sample(bytes.try_into().expect("chunks of a sample's bytes"));
                }
            }
        }
        frames
    }
}

/// A stem's container opened and its audio track found: everything short of a decoder.
struct OpenedFormat {
    container: Container,
    format: Box<dyn FormatReader>,
    track_id: u32,
    /// The track's parameters, with the channels taken from its layout when only that is declared.
    params: CodecParameters,
}

impl OpenedFormat {
    fn open(path: &Path, name: &str) -> Result<Self, AudioError> {
        let open_error = |source| AudioError::Open { stem: name.to_string(), source };
        let mut file = File::open(path).map_err(open_error)?;
        let mut magic = [0u8; 16];
        let magic_len = read_up_to(&mut file, &mut magic).map_err(open_error)?;
        let container = sniff_container(&magic[..magic_len]).map_err(|reason| AudioError::unsupported(name, reason))?;
        file.rewind().map_err(open_error)?;
        let source: Box<dyn MediaSource> =
            if container == Container::Rf64 { Box::new(Rf64AsRiff::open(file).map_err(|reason| AudioError::unsupported(name, reason))?) } else { Box::new(file) };
        let stream = MediaSourceStream::new(source, Default::default());
        let mut hint = Hint::new();
        hint.with_extension(container.extension());
        let format_options = FormatOptions { enable_gapless: true, ..Default::default() };
        let probed = symphonia::default::get_probe()
            .format(&hint, stream, &format_options, &MetadataOptions::default())
            .map_err(|err| AudioError::unsupported(name, describe(&err)))?;
        let format = probed.format;
        let track = format.tracks().iter().find(|t| t.codec_params.codec != CODEC_TYPE_NULL).ok_or_else(|| AudioError::unsupported(name, "it has no audio track"))?;
        let mut params = track.codec_params.clone();
        let track_id = track.id;
        if params.channels.is_none() {
            params.channels = params.channel_layout.map(|l| l.into_channels());
        }
        Ok(Self { container, format, track_id, params })
    }

    /// The channels of the first packet that decodes, for a container that does not declare them.
    /// It reads packets, so it takes the reader: decoding proper starts on a freshly opened one.
    fn decode_channels(mut self, name: &str) -> Result<Channels, AudioError> {
        let mut decoder = make_decoder(&self.params, name)?;
        for _ in 0..64 {
            let Ok(packet) = self.format.next_packet() else { break };
            if packet.track_id() != self.track_id {
                continue;
            }
            if let Ok(decoded) = decoder.decode(&packet) {
                if decoded.frames() > 0 {
                    return Ok(decoded.spec().channels);
                }
            }
        }
        Err(AudioError::unsupported(name, "no packet decodes, so the channel count is unknown"))
    }
}

fn make_decoder(params: &CodecParameters, name: &str) -> Result<Box<dyn Decoder>, AudioError> {
    symphonia::default::get_codecs().make(params, &DecoderOptions::default()).map_err(|err| AudioError::unsupported(name, describe(&err)))
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
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(AudioError::Decode { stem: stem.to_string(), reason: format!("the decoder crashed: {}", panic_message(&*panic)) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;

    /// A WAV of noise at `bits` that starts at both ends of the scale, less its last `cut` bytes.
    fn wav(dir: &Path, bits: u16, channels: u16, frames: usize, cut: u64) -> std::path::PathBuf {
        let path = dir.join(format!("{bits}-{channels}-{cut}.wav"));
        let spec = hound::WavSpec { channels, sample_rate: 44_100, bits_per_sample: bits, sample_format: hound::SampleFormat::Int };
        let mut writer = hound::WavWriter::create(&path, spec).unwrap();
        let full_scale = (1i32 << (bits - 1)) as f32;
        let noise = test_noise(frames * usize::from(channels), u64::from(channels) + cut);
        let ends = [-(full_scale as i32), full_scale as i32 - 1, -1, 0];
        for sample in ends.into_iter().chain(noise.iter().skip(4).map(|x| (x * (full_scale - 1.0)) as i32)) {
            writer.write_sample(sample).unwrap();
        }
        writer.finalize().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(file.metadata().unwrap().len() - cut).unwrap();
        path
    }

    fn read_all(mut reader: StemReader) -> (Vec<u32>, u64) {
        let (mut chunk, mut bits) = (StereoBuffer::default(), Vec::new());
        while reader.next_chunk(&mut chunk).unwrap() {
            bits.extend(chunk.left.iter().zip(&chunk.right).flat_map(|(l, r)| [l.to_bits(), r.to_bits()]));
        }
        (bits, reader.decoded_frames)
    }

    #[test]
    fn pcm_read_from_its_bytes_is_what_symphonia_s_decoder_gives() {
        let dir = tempfile::tempdir().unwrap();
        // Mono, stereo, four channels downmixed, and a file cut inside its last frame.
        for (bits, pcm) in [(16, RawPcm::S16), (24, RawPcm::S24)] {
            for (channels, cut) in [(1, 0), (2, 0), (4, 0), (2, 3)] {
                let path = wav(dir.path(), bits, channels, 10_000, cut);
                let from_bytes = StemReader::open(&path, "stem").unwrap();
                assert_eq!(from_bytes.raw_pcm, Some(pcm), "{bits} bits, {channels} channels: read from the bytes");
                let mut decoded = StemReader::open(&path, "stem").unwrap();
                decoded.raw_pcm = None;
                let ((bits_read, frames), (expected_bits, expected_frames)) = (read_all(from_bytes), read_all(decoded));
                assert_eq!(frames, expected_frames, "{bits} bits, {channels} channels, cut {cut}");
                assert_eq!(frames, if cut == 0 { 10_000 } else { 9_999 });
                assert!(bits_read == expected_bits, "{bits} bits, {channels} channels, cut {cut}: the samples differ");
            }
        }
    }
}
