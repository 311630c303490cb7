//! Opus by libopus (through the `opus` crate) in an Ogg container (the `ogg` crate), as RFC 7845
//! lays it out: at 48 kHz (the mix converted with the same resampler the stems go through), 20 ms
//! frames, VBR at the asked bitrate with libopus's default complexity, as ffmpeg's libopus
//! encodes. The header's pre-skip is the encoder's lookahead and the last page's granule position
//! ends the stream at the master's length, so a decoder trims both ends: gapless.
//!
//! The file is measured as it is made: each packet goes to a thread that decodes and meters it
//! as a player would, on the core the encoder leaves idle, and once the file is written its
//! packets are read back and checked to be exactly those measured.

use std::hash::Hasher;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use ogg::{PacketReader, PacketWriteEndInfo, PacketWriter};
use opus::{Application, Bitrate, Channels};

use super::{encoder_error, LossyEncoder, Measured, Meter};
use crate::audio::buffer::StereoBuffer;
use crate::audio::export::PartialFile;
use crate::audio::resample::RateConverter;
use crate::audio::settings::Format;
use crate::audio::AudioError;

/// Opus always decodes at 48 kHz.
pub const OPUS_RATE: u32 = 48_000;
/// 20 ms, libopus's and ffmpeg's default frame.
const FRAME: usize = 960;
/// A page ends after this many packets: a second of audio, so a seek reads at most that much.
const PACKETS_PER_PAGE: u64 = 50;
/// The largest packet libopus makes (RFC 6716 § 3.4: 1275 bytes per frame, plus framing).
const MAX_PACKET: usize = 4000;
const SERIAL: u32 = 0x6d69_7864;
/// Packets on their way to the measuring thread, at most: a second of audio.
const PACKETS_IN_FLIGHT: usize = 50;

/// One packet of the stream, and where the stream ends if it is the last.
struct Packet {
    data: Vec<u8>,
    end: Option<u64>,
}

pub struct OpusEncoder {
    encoder: opus::Encoder,
    converter: RateConverter,
    converted: StereoBuffer,
    interleaved: Vec<f32>,
    pre_skip: u64,
    /// Input samples (per channel, at 48 kHz) that are the master's.
    frames_in: u64,
    packets: u64,
    packet: Vec<u8>,
    writer: PacketWriter<'static, BufWriter<std::fs::File>>,
    partial: PartialFile,
    /// Of every packet written, to check the file against.
    digest: PacketDigest,
    measuring: SyncSender<Packet>,
    meter: JoinHandle<Result<Measured, AudioError>>,
}

impl OpusEncoder {
    pub fn create(temporary: &Path, rate: u32, kbps: u32) -> Result<Self, AudioError> {
        let error = |err: &dyn std::fmt::Display| encoder_error(Format::Opus, err);
        let mut encoder = opus::Encoder::new(OPUS_RATE, Channels::Stereo, Application::Audio).map_err(|err| error(&err))?;
        encoder.set_bitrate(Bitrate::Bits(kbps as i32 * 1000)).map_err(|err| error(&err))?;
        encoder.set_vbr(true).map_err(|err| error(&err))?;
        encoder.set_vbr_constraint(false).map_err(|err| error(&err))?;
        let pre_skip = encoder.get_lookahead().map_err(|err| error(&err))?;
        let partial = PartialFile::create(temporary)?;
        let mut writer = PacketWriter::new(BufWriter::with_capacity(1 << 18, partial.file.try_clone().map_err(AudioError::Export)?));
        // RFC 7845 § 5.1: the identification header, alone on the first page.
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1);
        head.push(2);
        head.extend_from_slice(&(pre_skip as u16).to_le_bytes());
        head.extend_from_slice(&rate.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes());
        head.push(0);
        writer.write_packet(head, SERIAL, PacketWriteEndInfo::EndPage, 0).map_err(AudioError::Export)?;
        // § 5.2: the comment header, on its own page too.
        let vendor = format!("mixd {} ({})", env!("CARGO_PKG_VERSION"), opus::version());
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor.as_bytes());
        tags.extend_from_slice(&0u32.to_le_bytes());
        writer.write_packet(tags, SERIAL, PacketWriteEndInfo::EndPage, 0).map_err(AudioError::Export)?;
        let (measuring, packets) = sync_channel::<Packet>(PACKETS_IN_FLIGHT);
        let pre_skip = pre_skip as u64;
        let meter = std::thread::Builder::new()
            .name("mixd-opus-meter".into())
            .spawn(move || {
                let mut decoder = PlayerDecoder::new(pre_skip)?;
                let mut meter = Meter::default();
                for packet in packets {
                    let segment = decoder.decode(&packet.data, packet.end)?;
                    if !segment.is_empty() {
                        meter.push(segment, OPUS_RATE);
                    }
                }
                meter.finish().ok_or_else(|| encoder_error(Format::Opus, "it decodes to nothing"))
            })
            .map_err(AudioError::Export)?;
        Ok(Self {
            encoder,
            converter: RateConverter::new(rate, OPUS_RATE)?,
            converted: StereoBuffer::default(),
            interleaved: Vec::new(),
            pre_skip,
            frames_in: 0,
            packets: 0,
            packet: vec![0; MAX_PACKET],
            writer,
            partial,
            digest: PacketDigest::default(),
            measuring,
            meter,
        })
    }

    /// Encodes every whole frame of the converted audio; at the `end`, pads the rest with silence
    /// until the encoder has given out the last real sample (its lookahead holds it back).
    fn encode(&mut self, end: bool) -> Result<(), AudioError> {
        self.frames_in += self.converted.len() as u64;
        for (l, r) in self.converted.left.iter().zip(&self.converted.right) {
            self.interleaved.extend_from_slice(&[*l, *r]);
        }
        self.converted.clear();
        let last_granule = self.pre_skip + self.frames_in;
        let mut at = 0;
        loop {
            let whole = self.interleaved.len() - at >= 2 * FRAME;
            let needed = end && (self.packets * FRAME as u64) < last_granule;
            if !whole && !needed {
                break;
            }
            if !whole {
                self.interleaved.resize(at + 2 * FRAME, 0.0);
            }
            let bytes = self.encoder.encode_float(&self.interleaved[at..at + 2 * FRAME], &mut self.packet).map_err(|err| encoder_error(Format::Opus, err))?;
            at += 2 * FRAME;
            self.packets += 1;
            let granule = self.packets * FRAME as u64;
            let (info, granule) = if end && granule >= last_granule {
                (PacketWriteEndInfo::EndStream, last_granule)
            } else if self.packets.is_multiple_of(PACKETS_PER_PAGE) {
                (PacketWriteEndInfo::EndPage, granule)
            } else {
                (PacketWriteEndInfo::NormalPacket, granule)
            };
            let data = self.packet[..bytes].to_vec();
            let end = (info == PacketWriteEndInfo::EndStream).then_some(granule);
            self.digest.add(&data, end);
            // The meter gone means it failed: its error is what `finish` reports.
            let _ = self.measuring.send(Packet { data: data.clone(), end });
            self.writer.write_packet(data, SERIAL, info, granule).map_err(AudioError::Export)?;
            if info == PacketWriteEndInfo::EndStream {
                break;
            }
        }
        self.interleaved.drain(..at.min(self.interleaved.len()));
        Ok(())
    }
}

impl LossyEncoder for OpusEncoder {
    fn write(&mut self, segment: &StereoBuffer) -> Result<(), AudioError> {
        self.converter.push(segment, &mut self.converted)?;
        self.encode(false)
    }

    fn finish(mut self: Box<Self>) -> Result<Measured, AudioError> {
        let mut tail = StereoBuffer::default();
        self.converter.finish(&mut tail)?;
        self.converted = tail;
        self.encode(true)?;
        let Self { writer, partial, digest, measuring, meter, pre_skip, .. } = *self;
        writer.into_inner().flush().map_err(AudioError::Export)?;
        drop(measuring);
        let measured = meter.join().map_err(|panic| AudioError::Internal(format!("the Opus meter panicked: {}", crate::audio::panic_message(&*panic))))??;
        // What was measured is what a player of the file hears only if the file holds exactly
        // those packets.
        let (mut file, mut read) = (OggOpusReader::open(partial.path())?, PacketDigest::default());
        while let Some(packet) = file.next_packet()? {
            read.add(&packet.data, packet.end);
        }
        if read != digest || file.pre_skip != pre_skip {
            return Err(encoder_error(Format::Opus, "reading it back: the file's packets are not those encoded"));
        }
        partial.keep()?;
        Ok(measured)
    }
}

/// An Ogg Opus file's audio packets, each with where the stream ends if it is the last.
struct OggOpusReader {
    reader: PacketReader<BufReader<std::fs::File>>,
    pre_skip: u64,
    ended: bool,
}

impl OggOpusReader {
    fn open(path: &Path) -> Result<Self, AudioError> {
        let mut reader = PacketReader::new(BufReader::new(std::fs::File::open(path).map_err(AudioError::Export)?));
        let head = reader.read_packet_expected().map_err(read_back_error)?;
        if head.data.len() < 19 || &head.data[..8] != b"OpusHead" || head.data[9] != 2 {
            return Err(read_back_error("no stereo OpusHead"));
        }
        let pre_skip = u64::from(u16::from_le_bytes([head.data[10], head.data[11]]));
        reader.read_packet_expected().map_err(read_back_error)?;
        Ok(Self { reader, pre_skip, ended: false })
    }

    fn next_packet(&mut self) -> Result<Option<Packet>, AudioError> {
        if self.ended {
            return Ok(None);
        }
        let Some(packet) = self.reader.read_packet().map_err(read_back_error)? else { return Ok(None) };
        self.ended = packet.last_in_stream();
        let end = self.ended.then(|| packet.absgp_page());
        Ok(Some(Packet { data: packet.data, end }))
    }
}

fn read_back_error(err: impl std::fmt::Display) -> AudioError {
    encoder_error(Format::Opus, format!("reading it back: {err}"))
}

/// Packets and end positions, hashed in order: equal digests, equal streams.
#[derive(Default, PartialEq)]
struct PacketDigest {
    packets: u64,
    hash: u64,
}

impl PacketDigest {
    fn add(&mut self, data: &[u8], end: Option<u64>) {
        let mut hasher = std::hash::DefaultHasher::new();
        hasher.write_u64(self.hash);
        hasher.write(data);
        hasher.write_u64(end.unwrap_or(u64::MAX));
        self.hash = hasher.finish();
        self.packets += 1;
    }
}

/// Decodes an Opus stream's packets as a player does: the pre-skip dropped from the start, and
/// the stream cut at the end position its last packet carries.
struct PlayerDecoder {
    decoder: opus::Decoder,
    pcm: Vec<f32>,
    segment: StereoBuffer,
    pre_skip: u64,
    /// Samples decoded so far, counted from the stream's start (pre-skip included).
    position: u64,
}

impl PlayerDecoder {
    fn new(pre_skip: u64) -> Result<Self, AudioError> {
        let decoder = opus::Decoder::new(OPUS_RATE, Channels::Stereo).map_err(read_back_error)?;
        // 120 ms, the longest an Opus packet lasts.
        Ok(Self { decoder, pcm: vec![0f32; 2 * 5760], segment: StereoBuffer::default(), pre_skip, position: 0 })
    }

    fn decode(&mut self, packet: &[u8], end: Option<u64>) -> Result<&StereoBuffer, AudioError> {
        let frames = self.decoder.decode_float(packet, &mut self.pcm, false).map_err(read_back_error)? as u64;
        let from = self.pre_skip.saturating_sub(self.position).min(frames);
        let to = end.unwrap_or(u64::MAX).saturating_sub(self.position).min(frames);
        self.segment.clear();
        for i in from as usize..to.max(from) as usize {
            self.segment.left.push(self.pcm[2 * i]);
            self.segment.right.push(self.pcm[2 * i + 1]);
        }
        self.position += frames;
        Ok(&self.segment)
    }
}

/// Decodes an Ogg Opus file as a player does, handing its audio to `take` in pieces.
pub fn decode(path: &Path, take: &mut dyn FnMut(&StereoBuffer, u32) -> Result<(), AudioError>) -> Result<(), AudioError> {
    let mut file = OggOpusReader::open(path)?;
    let mut decoder = PlayerDecoder::new(file.pre_skip)?;
    while let Some(packet) = file.next_packet()? {
        let segment = decoder.decode(&packet.data, packet.end)?;
        if !segment.is_empty() {
            take(segment, OPUS_RATE)?;
        }
    }
    Ok(())
}
