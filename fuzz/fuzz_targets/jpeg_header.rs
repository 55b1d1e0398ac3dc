//! The JPEG header parser and the packer's sanitizer (with its strict decode) on arbitrary bytes,
//! with small limits so a decode never allocates much. No input may panic, and:
//! - a kept file's header parses and gives the size the sanitizer reported;
//! - a re-encoded file is itself clean: the sanitizer keeps it as it is;
//! - the sanitizer is deterministic.
//!
//! The first byte picks the options: bit 0 sets a maximum side (16..136 from bits 4..7),
//! bit 1 the skip policy, bit 2 turns `verify_decode` off.
#![no_main]

use convnets_formats::jpeg;
use convnets_pack::sanitize::{sanitize, AwkwardPolicy, Outcome, SanitizeOptions};
use libfuzzer_sys::fuzz_target;

/// 256x256: enough for real headers, small enough to decode quickly.
const MAX_PIXELS: u64 = 1 << 16;

fuzz_target!(|input: &[u8]| {
    let Some((&opt, data)) = input.split_first() else {
        return;
    };
    if let Ok(info) = jpeg::parse_header(data) {
        let _ = jpeg::chroma_subsampling(&info);
        let _ = jpeg::color_space(&info);
        assert!(info.width > 0 && info.height > 0);
    }

    let opts = SanitizeOptions {
        max_pixels: MAX_PIXELS,
        max_side: (opt & 1 != 0).then(|| 16 + 8 * u32::from(opt >> 4)),
        awkward: if opt & 2 != 0 {
            AwkwardPolicy::Skip
        } else {
            AwkwardPolicy::Reencode
        },
        quality: 90,
        verify_decode: opt & 4 == 0,
    };
    let outcome = sanitize(data, &opts);
    match &outcome {
        Outcome::Kept { width, height } => {
            let info = jpeg::parse_header(data).expect("a kept file's header parses");
            assert_eq!((info.width, info.height), (*width, *height));
            assert!(u64::from(*width) * u64::from(*height) <= MAX_PIXELS);
            assert!(info.has_eoi);
        }
        Outcome::Reencoded {
            data: out,
            width,
            height,
            reason,
        } => {
            let info = jpeg::parse_header(out).expect("re-encoded output parses");
            assert_eq!(
                (info.width, info.height),
                (*width, *height),
                "re-encoded for {reason}"
            );
            let again = sanitize(out, &opts);
            assert!(
                matches!(again, Outcome::Kept { width: w, height: h } if (w, h) == (*width, *height)),
                "re-encoded output (for {reason}) is not kept as it is: {again:?}"
            );
        }
        Outcome::SkippedAwkward { .. } => assert_eq!(opts.awkward, AwkwardPolicy::Skip),
        Outcome::Rejected(_) => {}
    }
    if data.len() <= 4096 {
        assert_eq!(
            sanitize(data, &opts),
            outcome,
            "sanitize is not deterministic"
        );
    }
});
