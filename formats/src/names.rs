//! File names as people should read them. A Unix file name is bytes; `Path::display`
//! replaces bytes that are not UTF-8 with U+FFFD, so two different names can print the
//! same. [`escaped`] keeps UTF-8 names as they are and writes other names with each stray
//! byte as `\xNN` (and `\` as `\\`), so distinct names always read differently.

use std::ffi::OsStr;
use std::path::Path;

/// `name` for messages and reports: itself when it is UTF-8, else escaped (see the module docs).
pub fn escaped(name: &OsStr) -> String {
    if let Some(s) = name.to_str() {
        return s.to_string();
    }
    let mut out = String::new();
    for chunk in name.as_encoded_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// A path for messages: [`escaped`] as a whole (the separators are plain bytes).
pub fn escaped_path(path: &Path) -> String {
    escaped(path.as_os_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn names_that_are_not_utf8_stay_distinct() {
        assert_eq!(escaped(OsStr::new("n01440764")), "n01440764");
        let a = escaped(OsStr::from_bytes(b"caf\xE9"));
        let b = escaped(OsStr::from_bytes(b"caf\xE8"));
        assert_eq!(a, "caf\\xE9");
        assert_ne!(a, b);
        assert_eq!(escaped(OsStr::from_bytes(b"a\\\xFF")), "a\\\\\\xFF");
        assert_eq!(
            escaped_path(Path::new(OsStr::from_bytes(b"train/\xFF/x.JPEG"))),
            "train/\\xFF/x.JPEG"
        );
    }
}
