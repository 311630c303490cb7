//! Opus by libopus (through the `opus` crate) in an Ogg container (the `ogg` crate), as RFC 7845
//! lays it out: at 48 kHz (the mix converted with the same resampler the stems go through), 20 ms
//! frames, VBR at the asked bitrate with libopus's default complexity, as ffmpeg's libopus
//! encodes. The header's pre-skip is the encoder's lookahead and the last page's granule position
//! ends the stream at the master's length, so a decoder trims both ends: gapless.

use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use ogg::{PacketReader, PacketWriteEndInfo, PacketWriter};
use opus::{Application, Bitrate, Channels};

use super::{encoder_error, LossyEncoder};
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
        Ok(Self {
            encoder,
            converter: RateConverter::new(rate, OPUS_RATE)?,
            converted: StereoBuffer::default(),
            interleaved: Vec::new(),
            pre_skip: pre_skip as u64,
            frames_in: 0,
            packets: 0,
            packet: vec![0; MAX_PACKET],
            writer,
            partial,
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
            self.writer.write_packet(self.packet[..bytes].to_vec(), SERIAL, info, granule).map_err(AudioError::Export)?;
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

    fn finish(mut self: Box<Self>) -> Result<(), AudioError> {
        let mut tail = StereoBuffer::default();
        self.converter.finish(&mut tail)?;
        self.converted = tail;
        self.encode(true)?;
        let Self { writer, partial, .. } = *self;
        writer.into_inner().flush().map_err(AudioError::Export)?;
        partial.keep()
    }
}

/// Decodes an Ogg Opus file as a player does, handing its audio to `take` in pieces: the
/// pre-skip dropped from the start and the stream cut at its last granule position.
pub fn decode(path: &Path, take: &mut dyn FnMut(&StereoBuffer, u32) -> Result<(), AudioError>) -> Result<(), AudioError> {
    let error = |err: &dyn std::fmt::Display| encoder_error(Format::Opus, format!("reading it back: {err}"));
    let mut reader = PacketReader::new(BufReader::new(std::fs::File::open(path).map_err(AudioError::Export)?));
    let head = reader.read_packet_expected().map_err(|err| error(&err))?;
    if head.data.len() < 19 || &head.data[..8] != b"OpusHead" || head.data[9] != 2 {
        return Err(error(&"no stereo OpusHead"));
    }
    let pre_skip = u64::from(u16::from_le_bytes([head.data[10], head.data[11]]));
    reader.read_packet_expected().map_err(|err| error(&err))?;
    let mut decoder = opus::Decoder::new(OPUS_RATE, Channels::Stereo).map_err(|err| error(&err))?;
    let mut pcm = vec![0f32; 2 * 5760];
    let mut segment = StereoBuffer::default();
    // Samples decoded so far, counted from the stream's start (pre-skip included).
    let mut position = 0u64;
    while let Some(packet) = reader.read_packet().map_err(|err| error(&err))? {
        let frames = decoder.decode_float(&packet.data, &mut pcm, false).map_err(|err| error(&err))? as u64;
        // The last page's granule position is where the stream ends.
        let end = if packet.last_in_stream() { packet.absgp_page() } else { u64::MAX };
        let from = pre_skip.saturating_sub(position).min(frames);
        let to = end.saturating_sub(position).min(frames);
        segment.clear();
        for i in from..to.max(from) {
            segment.left.push(pcm[2 * i as usize]);
            segment.right.push(pcm[2 * i as usize + 1]);
        }
        position += frames;
        if !segment.is_empty() {
            take(&segment, OPUS_RATE)?;
        }
        if packet.last_in_stream() {
            break;
        }
    }
    Ok(())
}
