//! The pack-time check of a JPEG's entropy-coded data: a full decode by libjpeg-turbo (the
//! decoder of the loader's CPU path) that stops at the first warning.
//!
//! libjpeg reports damaged data (bad Huffman codes, data missing inside a scan, restart
//! markers out of sequence, extraneous bytes) as warnings and goes on, filling what it could
//! not decode with grey; the `image` crate's decoder conceals the same damage silently. A
//! record must decode cleanly wherever the loader decodes it, so here a warning refuses the
//! file; a file libjpeg-turbo decodes without a warning is accepted.
//!
//! One warning is let through: extraneous bytes right before the end-of-image marker. It is
//! raised only once every scan has been decoded in full (the stop at the first warning means
//! no earlier one was raised), so the image is whole; the loader's libjpeg-turbo decodes
//! such files without complaint and its GPU path hands files nvJPEG refuses to the CPU.
//! Some web JPEGs carry such padding, and dropping them would change a dataset's size.

use std::ffi::{c_int, CStr};

use convnets_formats::jpeg::JpegInfo;
use turbojpeg_sys as tj;

/// Progressive files may have at most this many scans (as in the loader): a file with
/// thousands of tiny scans is a way to make a small file cost minutes of decoding.
const MAX_PROGRESSIVE_SCANS: c_int = 500;

/// Decodes `jpeg` in full and returns libjpeg-turbo's message for the first warning or
/// error, if any. `info` is the header parsed from the same bytes; the caller has checked
/// its pixel count against `max_pixels`, which bounds the buffer allocated here.
pub fn decode_strict(jpeg: &[u8], info: &JpegInfo, max_pixels: u64) -> Result<(), String> {
    let handle = Handle::open(max_pixels)?;
    // SAFETY: valid handle; TurboJPEG reads at most `jpeg.len()` bytes.
    let rc = unsafe { tj::tj3DecompressHeader(handle.0, jpeg.as_ptr(), jpeg.len() as _) };
    handle.check(rc)?;
    let (format, channels) = match info.components {
        1 => (tj::TJPF_TJPF_GRAY, 1usize),
        // TurboJPEG converts CMYK and YCCK to CMYK only.
        4 => (tj::TJPF_TJPF_CMYK, 4usize),
        _ => (tj::TJPF_TJPF_RGB, 3usize),
    };
    // The size TurboJPEG decodes to is the one it read, not necessarily ours.
    let (width, height) = (
        handle.get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
        handle.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    let (Ok(width), Ok(height)) = (usize::try_from(width), usize::try_from(height)) else {
        return Err(format!("libjpeg-turbo reads a {width}x{height} frame"));
    };
    if (width as u64).saturating_mul(height as u64) > max_pixels {
        return Err(format!(
            "libjpeg-turbo reads a {width}x{height} frame, over the pixel limit"
        ));
    }
    let pitch = width * channels;
    let mut pixels = vec![0u8; pitch * height];
    // SAFETY: valid handle; `pixels` holds `height` rows of `pitch` bytes, the whole frame
    // whose size the header call on the same bytes just read.
    let rc = unsafe {
        tj::tj3Decompress8(
            handle.0,
            jpeg.as_ptr(),
            jpeg.len() as _,
            pixels.as_mut_ptr(),
            pitch as c_int,
            format,
        )
    };
    match handle.check(rc) {
        Err(msg) if is_padding_before_eoi(&msg) => Ok(()),
        result => result,
    }
}

/// libjpeg's JWRN_EXTRANEOUS_DATA for the EOI marker: bytes after the last scan's data.
fn is_padding_before_eoi(msg: &str) -> bool {
    msg.strip_prefix("Corrupt JPEG data: ")
        .and_then(|m| m.strip_suffix(" extraneous bytes before marker 0xd9"))
        .is_some_and(|count| count.parse::<u64>().is_ok())
}

/// Owns a TurboJPEG decompression handle set up to stop at the first warning.
struct Handle(tj::tjhandle);

impl Handle {
    fn open(max_pixels: u64) -> Result<Self, String> {
        // SAFETY: plain constructor; a null return is an allocation failure.
        let raw = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if raw.is_null() {
            // SAFETY: with a null handle TurboJPEG reports its global (thread-local) message.
            return Err(unsafe { error_string(std::ptr::null_mut()) });
        }
        let handle = Self(raw);
        // 0 means no limit to libjpeg-turbo: used when ours does not fit (ours still applies).
        let max_pixels = c_int::try_from(max_pixels).unwrap_or(0);
        for (param, value) in [
            (tj::TJPARAM_TJPARAM_STOPONWARNING, 1),
            (tj::TJPARAM_TJPARAM_MAXPIXELS, max_pixels),
            (tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_PROGRESSIVE_SCANS),
            (tj::TJPARAM_TJPARAM_SAVEMARKERS, 0),
        ] {
            // SAFETY: valid handle; plain values.
            if unsafe { tj::tj3Set(handle.0, param as c_int, value) } != 0 {
                // SAFETY: valid handle.
                return Err(unsafe { error_string(handle.0) });
            }
        }
        Ok(handle)
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: valid handle.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    /// A call's result: with STOPONWARNING every warning is a failure (-1), like an error.
    fn check(&self, rc: c_int) -> Result<(), String> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: valid handle.
        Err(unsafe { error_string(self.0) })
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// TurboJPEG's message for the last call on `handle`, on one line.
///
/// # Safety
/// `handle` is a live TurboJPEG handle or null.
unsafe fn error_string(handle: tj::tjhandle) -> String {
    // SAFETY: TurboJPEG returns a NUL-terminated string it owns (in the handle or
    // thread-local), valid until the next call on this thread; it is copied at once.
    let ptr = unsafe { tj::tj3GetErrorStr(handle) };
    if ptr.is_null() {
        return "unknown libjpeg-turbo error".into();
    }
    // SAFETY: as above.
    let msg = unsafe { CStr::from_ptr(ptr) }.to_string_lossy();
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use convnets_formats::jpeg::parse_header;
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

    const SOS: u8 = 0xDA;
    const EOI: u8 = 0xD9;
    const RST0: u8 = 0xD0;

    /// A smooth colour gradient, so every block has AC coefficients.
    fn gradient(width: u16, height: u16) -> Vec<u8> {
        let mut data = Vec::with_capacity(usize::from(width) * usize::from(height) * 3);
        for y in 0..height {
            for x in 0..width {
                data.extend_from_slice(&[(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]);
            }
        }
        data
    }

    fn encode(width: u16, height: u16, setup: impl FnOnce(&mut Encoder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = Encoder::new(&mut out, 90);
        setup(&mut encoder);
        encoder
            .encode(&gradient(width, height), width, height, ColorType::Rgb)
            .expect("encode");
        out
    }

    fn check(jpeg: &[u8]) -> Result<(), String> {
        let info = parse_header(jpeg).map_err(|e| e.to_string())?;
        decode_strict(jpeg, &info, crate::sanitize::DEFAULT_MAX_PIXELS)
    }

    /// Offset of the first `0xFF marker` at segment level.
    fn find_marker(jpeg: &[u8], marker: u8) -> usize {
        let mut pos = 2;
        while jpeg[pos + 1] != marker {
            pos += 2 + usize::from(u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]));
        }
        pos
    }

    #[test]
    fn clean_files_of_every_kind_decode() {
        for factor in [
            SamplingFactor::R_4_4_4,
            SamplingFactor::R_4_2_2,
            SamplingFactor::R_4_2_0,
            SamplingFactor::R_4_4_0,
            SamplingFactor::R_4_1_1,
        ] {
            check(&encode(40, 24, |e| e.set_sampling_factor(factor)))
                .unwrap_or_else(|e| panic!("{factor:?}: {e}"));
        }
        check(&encode(33, 17, |e| e.set_progressive(true))).expect("progressive");
        // Optimized tables make jpeg-encoder write one scan per component.
        check(&encode(64, 40, |e| {
            e.set_sampling_factor(SamplingFactor::R_4_2_0);
            e.set_optimized_huffman_tables(true);
        }))
        .expect("one scan per component");
        let mut gray = Vec::new();
        Encoder::new(&mut gray, 80)
            .encode(&[100u8; 24 * 24], 24, 24, ColorType::Luma)
            .expect("encode");
        check(&gray).expect("grayscale");
        let mut cmyk = Vec::new();
        Encoder::new(&mut cmyk, 80)
            .encode(&[40u8; 16 * 16 * 4], 16, 16, ColorType::Cmyk)
            .expect("encode");
        check(&cmyk).expect("cmyk");
    }

    #[test]
    fn restart_markers_in_and_out_of_sequence() {
        let restarts = encode(64, 40, |e| {
            e.set_sampling_factor(SamplingFactor::R_4_2_0);
            e.set_restart_interval(3);
        });
        check(&restarts).expect("valid restart markers");
        let mut wrong_rst = restarts.clone();
        let rst = wrong_rst
            .windows(2)
            .position(|w| w == [0xFF, RST0])
            .expect("RST0");
        wrong_rst[rst + 1] = RST0 + 1;
        assert!(check(&wrong_rst).is_err());
    }

    #[test]
    fn corrupt_or_missing_scan_data_is_refused() {
        let jpeg = encode(64, 64, |_| {});
        let sos = find_marker(&jpeg, SOS);
        let data_start = sos + 2 + usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
        let mid = (data_start + jpeg.len()) / 2;
        // 32 one bits (0xFF is stuffed as FF 00): longer than any Huffman code.
        let mut corrupt = jpeg.clone();
        corrupt[mid..mid + 8].copy_from_slice(&[0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00]);
        let err = check(&corrupt).expect_err("corrupt data");
        assert!(err.contains("Corrupt JPEG data"), "{err}");
        // Valid codes with wrong values decode without a warning (libjpeg drops
        // coefficients past the 64th silently): what libjpeg-turbo takes is accepted.
        let mut wrong_values = jpeg.clone();
        wrong_values[mid..mid + 8].copy_from_slice(&[0xFE; 8]);
        check(&wrong_values).expect("decodes without a warning");
        // Data missing in the middle: the scan runs into EOI.
        let mut short = jpeg[..mid].to_vec();
        short.extend_from_slice(&[0xFF, EOI]);
        assert!(parse_header(&short).expect("parse").has_eoi);
        assert!(check(&short).is_err());
    }

    #[test]
    fn extraneous_bytes_refuse_the_file_unless_they_end_it() {
        // Bytes between the last scan and EOI: libjpeg decodes every row, then warns.
        let mut jpeg = encode(37, 21, |e| e.set_sampling_factor(SamplingFactor::R_4_2_0));
        let eoi = jpeg.len() - 2;
        jpeg.splice(eoi..eoi, [0x12, 0x34, 0x56]);
        check(&jpeg).expect("padding before EOI is not damage");
        // The same bytes before a later scan: what follows them is not known to be whole.
        let mut scans = encode(64, 40, |e| {
            e.set_sampling_factor(SamplingFactor::R_4_2_0);
            e.set_optimized_huffman_tables(true);
        });
        let first_sos = find_marker(&scans, SOS);
        let second_sos = first_sos
            + 2
            + scans[first_sos + 2..]
                .windows(2)
                .position(|w| w == [0xFF, SOS])
                .expect("a second scan");
        scans.splice(second_sos..second_sos, [0x12, 0x34, 0x56]);
        let err = check(&scans).expect_err("a warning");
        assert!(err.contains("extraneous bytes before marker 0xda"), "{err}");
    }
}
