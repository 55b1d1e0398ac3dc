//! `manifest.json` parsing and validation on arbitrary bytes: no panic; a manifest that
//! validates names only shard files directly inside the dataset folder, and survives a
//! save/load round trip unchanged.
#![no_main]

use std::path::Path;

use convnets_formats::manifest::shard_path;
use convnets_formats::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Manifest>(input) else {
        return;
    };
    let dir = Path::new("/dataset");
    let path = dir.join("manifest.json");
    if m.validate(&path).is_err() {
        return;
    }
    for (name, split) in &m.splits {
        assert_eq!(
            dir.join(name).parent(),
            Some(dir),
            "split name {name:?} leaves the folder"
        );
        let mut sum = 0u64;
        for s in &split.shards {
            let p = shard_path(dir, s);
            assert_eq!(
                p.parent(),
                Some(dir),
                "shard {:?} leaves the folder",
                s.file
            );
            assert_eq!(
                p.file_name().and_then(|f| f.to_str()),
                Some(s.file.as_str()),
                "shard {:?} is not a plain name",
                s.file
            );
            sum = sum
                .checked_add(s.records)
                .expect("validated counts do not overflow");
        }
        assert_eq!(sum, split.records);
    }
    // What `save` writes, `load` reads back as the same manifest.
    let text = serde_json::to_vec_pretty(&m).expect("a parsed manifest serialises");
    let back: Manifest = serde_json::from_slice(&text).expect("a saved manifest parses");
    assert_eq!(back, m);
    back.validate(&path).expect("a saved manifest validates");
});
