// Replays a committed fuzz corpus as an ordinary test: every file of `corpus/<target>` goes
// through `check`, which must not panic. Spliced (with `include!`) into the corpus replay tests of
// `sund-model` and `sund-sim`, so that both replay the same way.

/// Runs `check` on every file of `corpus/<target>`, which must not be empty.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus dir entry").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "corpus {} is empty: the replay would prove nothing",
        dir.display()
    );
    for path in &paths {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let result = std::panic::catch_unwind(|| check(&data));
        if let Err(panic) = result {
            eprintln!("corpus input {} failed", path.display());
            std::panic::resume_unwind(panic);
        }
    }
    println!("{target}: replayed {} corpus inputs", paths.len());
}
