//! FLAC by libFLAC 1.5 (the reference encoder, through `libflac-sys`), at its default compression
//! level 5, from the written WAV's own samples: the file decodes to exactly them. (flacenc, the
//! pure-Rust encoder, writes 24-bit audio at over 1.5 times its WAV size: its Rice parameters stop
//! at 14, flacenc-rs#246, fixed on its main branch but in no release.)
//!
//! The encoder writes through callbacks into our own file, so that an I/O error (a full disk)
//! comes back as the `std::io::Error` it was, and seeks back at the end to complete STREAMINFO
//! (length, MD5 signature).

use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use libflac_sys as ffi;

use super::encoder_error;
use crate::audio::export::PartialFile;
use crate::audio::settings::Format;
use crate::audio::AudioError;

/// libFLAC's default, as `flac` and ffmpeg use.
const COMPRESSION_LEVEL: u32 = 5;
/// Threads libFLAC encodes on, at most: other mixes share the machine.
const MAX_THREADS: usize = 4;
/// Frames handed to the encoder at a time.
const CHUNK: usize = 1 << 14;

/// Where the encoder's callbacks write, and the first error they met.
struct Sink {
    out: BufWriter<File>,
    error: Option<std::io::Error>,
}

/// The encoder, deleted however the encode ends.
struct Encoder(*mut ffi::FLAC__StreamEncoder);

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: the pointer came from FLAC__stream_encoder_new and is deleted once, here.
        unsafe { ffi::FLAC__stream_encoder_delete(self.0) }
    }
}

/// Encodes the WAV at `wav` (16 or 24-bit integer) into a FLAC file at `temporary`, calling
/// `progress` with the fraction done; `cancelled` is asked between chunks.
pub fn encode_wav(wav: &Path, temporary: &Path, progress: &dyn Fn(f64), cancelled: &dyn Fn() -> bool) -> Result<(), AudioError> {
    let error = |err: &dyn std::fmt::Display| encoder_error(Format::Flac, err);
    let reader = hound::WavReader::new(BufReader::with_capacity(1 << 20, File::open(wav).map_err(AudioError::Export)?)).map_err(|err| error(&err))?;
    let spec = reader.spec();
    if spec.sample_format != hound::SampleFormat::Int || !(16..=24).contains(&spec.bits_per_sample) {
        return Err(error(&"FLAC is made from 16 or 24-bit integer samples"));
    }
    let channels = usize::from(spec.channels);
    let total = u64::from(reader.duration());

    let partial = PartialFile::create(temporary)?;
    // Boxed: the callbacks hold its address until the encoder is finished.
    let mut sink = Box::new(Sink { out: BufWriter::with_capacity(1 << 20, partial.file.try_clone().map_err(AudioError::Export)?), error: None });
    // SAFETY: a plain constructor; a null pointer (out of memory) is checked.
    let encoder = Encoder(unsafe { ffi::FLAC__stream_encoder_new() });
    if encoder.0.is_null() {
        return Err(error(&"libFLAC could not allocate an encoder"));
    }
    // SAFETY: the encoder is valid and not yet initialised, when these setters may be called.
    let configured = unsafe {
        ffi::FLAC__stream_encoder_set_channels(encoder.0, u32::from(spec.channels)) != 0
            && ffi::FLAC__stream_encoder_set_bits_per_sample(encoder.0, u32::from(spec.bits_per_sample)) != 0
            && ffi::FLAC__stream_encoder_set_sample_rate(encoder.0, spec.sample_rate) != 0
            && ffi::FLAC__stream_encoder_set_compression_level(encoder.0, COMPRESSION_LEVEL) != 0
            && ffi::FLAC__stream_encoder_set_total_samples_estimate(encoder.0, total) != 0
    };
    if !configured {
        return Err(error(&"libFLAC refused the stream's parameters"));
    }
    // Frames are encoded apart and written in order, so the file is the same on any number of
    // threads; a libFLAC built without pthreads refuses, and encodes on one.
    let threads = std::thread::available_parallelism().map_or(1, |cores| cores.get().min(MAX_THREADS)) as u32;
    // SAFETY: as for the setters above.
    let threaded = unsafe { ffi::FLAC__stream_encoder_set_num_threads(encoder.0, threads) };
    if threaded != ffi::FLAC__STREAM_ENCODER_SET_NUM_THREADS_OK {
        tracing::debug!(threads, threaded, "libFLAC encodes on one thread");
    }
    let client = (&mut *sink as *mut Sink).cast::<libc::c_void>();
    // SAFETY: the callbacks match libFLAC's signatures and `client` points at `sink`, which lives
    // (boxed, not moved) until after the encoder is finished or dropped below.
    let status = unsafe { ffi::FLAC__stream_encoder_init_stream(encoder.0, Some(write), Some(seek), Some(tell), None, client) };
    if status != ffi::FLAC__STREAM_ENCODER_INIT_STATUS_OK {
        return Err(error(&format!("libFLAC could not start (status {status})")));
    }

    let mut samples = reader.into_samples::<i32>();
    let mut interleaved = Vec::with_capacity(CHUNK * channels);
    let mut done = 0u64;
    loop {
        if cancelled() {
            return Err(AudioError::Canceled);
        }
        interleaved.clear();
        for sample in samples.by_ref().take(CHUNK * channels) {
            interleaved.push(sample.map_err(|err| error(&err))?);
        }
        if interleaved.is_empty() {
            break;
        }
        let frames = interleaved.len() / channels;
        // SAFETY: `interleaved` holds `frames` whole frames of `channels` samples.
        if unsafe { ffi::FLAC__stream_encoder_process_interleaved(encoder.0, interleaved.as_ptr(), frames as u32) } == 0 {
            return Err(failure(&encoder, &mut sink));
        }
        done += frames as u64;
        progress(done as f64 / total.max(1) as f64);
    }
    // SAFETY: the encoder was initialised; finishing flushes the last frame and rewrites
    // STREAMINFO through the callbacks, with `sink` still alive.
    if unsafe { ffi::FLAC__stream_encoder_finish(encoder.0) } == 0 {
        return Err(failure(&encoder, &mut sink));
    }
    drop(encoder);
    sink.out.flush().map_err(AudioError::Export)?;
    drop(sink);
    partial.keep()
}

/// Why the encoder stopped: an I/O error of ours as it was, else libFLAC's own account.
fn failure(encoder: &Encoder, sink: &mut Sink) -> AudioError {
    if let Some(err) = sink.error.take() {
        return AudioError::Export(err);
    }
    // SAFETY: the encoder is valid; the string is static and NUL-terminated.
    let state = unsafe { std::ffi::CStr::from_ptr(ffi::FLAC__stream_encoder_get_resolved_state_string(encoder.0)) };
    encoder_error(Format::Flac, state.to_string_lossy())
}

/// # Safety
/// libFLAC calls it with `client` as given to `init_stream` (a live `Sink`) and `bytes` readable
/// at `buffer`.
unsafe extern "C" fn write(
    _: *const ffi::FLAC__StreamEncoder,
    buffer: *const ffi::FLAC__byte,
    bytes: usize,
    _: u32,
    _: u32,
    client: *mut libc::c_void,
) -> ffi::FLAC__StreamEncoderWriteStatus {
    let sink = unsafe { &mut *client.cast::<Sink>() };
    let data = unsafe { std::slice::from_raw_parts(buffer, bytes) };
    match sink.out.write_all(data) {
        Ok(()) => ffi::FLAC__STREAM_ENCODER_WRITE_STATUS_OK,
        Err(err) => {
            sink.error.get_or_insert(err);
            ffi::FLAC__STREAM_ENCODER_WRITE_STATUS_FATAL_ERROR
        }
    }
}

/// # Safety
/// As for [`write`].
unsafe extern "C" fn seek(_: *const ffi::FLAC__StreamEncoder, offset: u64, client: *mut libc::c_void) -> ffi::FLAC__StreamEncoderSeekStatus {
    let sink = unsafe { &mut *client.cast::<Sink>() };
    match sink.out.seek(SeekFrom::Start(offset)) {
        Ok(_) => ffi::FLAC__STREAM_ENCODER_SEEK_STATUS_OK,
        Err(err) => {
            sink.error.get_or_insert(err);
            ffi::FLAC__STREAM_ENCODER_SEEK_STATUS_ERROR
        }
    }
}

/// # Safety
/// As for [`write`], and `offset` writable.
unsafe extern "C" fn tell(_: *const ffi::FLAC__StreamEncoder, offset: *mut u64, client: *mut libc::c_void) -> ffi::FLAC__StreamEncoderTellStatus {
    let sink = unsafe { &mut *client.cast::<Sink>() };
    match sink.out.stream_position() {
        Ok(position) => {
            unsafe { *offset = position };
            ffi::FLAC__STREAM_ENCODER_TELL_STATUS_OK
        }
        Err(err) => {
            sink.error.get_or_insert(err);
            ffi::FLAC__STREAM_ENCODER_TELL_STATUS_ERROR
        }
    }
}
