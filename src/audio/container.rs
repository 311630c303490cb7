//! What a stem file is, told from its bytes rather than its name, and the container quirks
//! symphonia 0.5 does not handle itself: RF64/BW64 files are read as the RIFF WAV underneath, and
//! an Ogg file cut short is told from a whole one by its last page.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::Path;

use symphonia::core::io::MediaSource;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Container {
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
    pub(super) fn extension(self) -> &'static str {
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
pub(super) fn sniff_container(magic: &[u8]) -> Result<Container, String> {
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

/// Reads into `buf` until it is full or the file ends: the first bytes, to sniff.
pub(super) fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// An RF64/BW64 file presented as the RIFF WAV it is underneath, which symphonia 0.5 reads: RF64
/// moves the sizes that do not fit 32 bits into a `ds64` chunk and writes 0xFFFFFFFF in their
/// place. The header is copied with the real sizes put back and `ds64` renamed `JUNK` (which WAV
/// readers skip); the audio data is read from the file untouched. Data over 4 GB cannot be put
/// back into 32 bits and is refused (it would also exceed the 12-hour stem limit at most rates).
pub(super) struct Rf64AsRiff {
    file: File,
    header: Vec<u8>,
    position: u64,
    length: u64,
}

impl Rf64AsRiff {
    const MAX_HEADER: u64 = 1 << 20;

    pub(super) fn open(mut file: File) -> Result<Self, String> {
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

/// Whether an Ogg file ends with a whole page flagged end-of-stream. Ogg declares no length up
/// front, so this is how a file cut short is told from a complete one.
pub(super) fn ogg_ends_cleanly(path: &Path) -> std::io::Result<bool> {
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
}
