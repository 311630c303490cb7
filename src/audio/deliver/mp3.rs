//! MP3 by LAME (through `mp3lame-encoder`): constant bitrate, joint stereo and LAME's default
//! quality, as ffmpeg's libmp3lame encodes, with a LAME/Xing tag in the first frame. That tag
//! holds the encoder's delay and padding, which gapless decoders (symphonia, ffmpeg, browsers)
//! trim: the file decodes to the master's length.

use std::io::{BufWriter, Write};
use std::num::NonZeroU32;
use std::os::unix::fs::FileExt;
use std::path::Path;

use mp3lame_encoder::{Bitrate, Builder, DualPcm, Encoder, FlushGap, Mode, VbrMode};

use super::{encoder_error, measure, LossyEncoder, Measured};
use crate::audio::buffer::StereoBuffer;
use crate::audio::export::PartialFile;
use crate::audio::resample::RateConverter;
use crate::audio::settings::Format;
use crate::audio::AudioError;

/// The rate an MP3 of a mix at `rate` is encoded at: MPEG-1's 32, 44.1 or 48 kHz as they are (the
/// bitrates the contract allows need MPEG-1), any other rate converted to the nearest family.
pub fn mp3_rate(rate: u32) -> u32 {
    match rate {
        32_000 | 44_100 | 48_000 => rate,
        _ if rate.is_multiple_of(11_025) => 44_100,
        _ => 48_000,
    }
}

pub struct Mp3Encoder {
    encoder: Encoder,
    converter: RateConverter,
    converted: StereoBuffer,
    encoded: Vec<u8>,
    out: BufWriter<std::fs::File>,
    partial: PartialFile,
}

impl Mp3Encoder {
    pub fn create(temporary: &Path, rate: u32, kbps: u32) -> Result<Self, AudioError> {
        let error = |err: &dyn std::fmt::Display| encoder_error(Format::Mp3, err);
        let encoded_rate = mp3_rate(rate);
        let mut builder = Builder::new().ok_or_else(|| error(&"LAME could not start"))?;
        builder.set_num_channels(2).map_err(|err| error(&err))?;
        builder.set_sample_rate(encoded_rate).map_err(|err| error(&err))?;
        builder.set_output_sample_rate(NonZeroU32::new(encoded_rate)).map_err(|err| error(&err))?;
        builder.set_vbr_mode(VbrMode::Off).map_err(|err| error(&err))?;
        builder.set_brate(bitrate(kbps).ok_or_else(|| error(&format!("{kbps} kbps is not an MP3 bitrate")))?).map_err(|err| error(&err))?;
        builder.set_mode(Mode::JointStereo).map_err(|err| error(&err))?;
        builder.set_to_write_vbr_tag(true).map_err(|err| error(&err))?;
        let encoder = builder.build().map_err(|err| error(&err))?;
        let partial = PartialFile::create(temporary)?;
        let out = BufWriter::with_capacity(1 << 20, partial.file.try_clone().map_err(AudioError::Export)?);
        Ok(Self { encoder, converter: RateConverter::new(rate, encoded_rate)?, converted: StereoBuffer::default(), encoded: Vec::new(), out, partial })
    }

    fn encode_converted(&mut self) -> Result<(), AudioError> {
        let frames = self.converted.len();
        self.encoded.clear();
        // LAME's documented worst case: 1.25 bytes per sample plus 7200.
        self.encoded.reserve(frames * 5 / 4 + 7200);
        let input = DualPcm { left: &self.converted.left, right: &self.converted.right };
        self.encoder.encode_to_vec(input, &mut self.encoded).map_err(|err| encoder_error(Format::Mp3, err))?;
        self.converted.clear();
        self.out.write_all(&self.encoded).map_err(AudioError::Export)
    }
}

impl LossyEncoder for Mp3Encoder {
    fn write(&mut self, segment: &StereoBuffer) -> Result<(), AudioError> {
        self.converter.push(segment, &mut self.converted)?;
        self.encode_converted()
    }

    fn finish(mut self: Box<Self>) -> Result<Measured, AudioError> {
        let mut tail = StereoBuffer::default();
        self.converter.finish(&mut tail)?;
        self.converted = tail;
        self.encode_converted()?;
        self.encoded.clear();
        self.encoded.reserve(7200);
        self.encoder.flush_to_vec::<FlushGap>(&mut self.encoded).map_err(|err| encoder_error(Format::Mp3, err))?;
        self.out.write_all(&self.encoded).map_err(AudioError::Export)?;
        self.out.flush().map_err(AudioError::Export)?;
        // The first frame was a placeholder for the tag, now that the length and padding are known.
        let mut tag = Vec::with_capacity(2048);
        self.encoder.lame_tag_encode_to_vec(&mut tag).ok_or_else(|| encoder_error(Format::Mp3, "LAME wrote no LAME tag"))?;
        self.partial.file.write_all_at(&tag, 0).map_err(AudioError::Export)?;
        let Self { partial, out, .. } = *self;
        drop(out);
        let measured = measure(partial.path(), Format::Mp3)?;
        partial.keep()?;
        Ok(measured)
    }
}

fn bitrate(kbps: u32) -> Option<Bitrate> {
    Some(match kbps {
        96 => Bitrate::Kbps96,
        112 => Bitrate::Kbps112,
        128 => Bitrate::Kbps128,
        160 => Bitrate::Kbps160,
        192 => Bitrate::Kbps192,
        224 => Bitrate::Kbps224,
        256 => Bitrate::Kbps256,
        320 => Bitrate::Kbps320,
        _ => return None,
    })
}
