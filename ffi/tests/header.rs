//! The checked-in `include/membroker.h` is what cbindgen makes of the sources now. Run with
//! `MEMBROKER_REGENERATE_HEADER=1` to rewrite it.

use std::path::Path;

const REGENERATE: &str = "MEMBROKER_REGENERATE_HEADER";

#[test]
fn header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen cannot generate the header")
        .write(&mut generated);
    let path = dir.join("include/membroker.h");
    if std::env::var_os(REGENERATE).is_some() {
        std::fs::write(&path, &generated).expect("write include/membroker.h");
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "ffi/include/membroker.h is stale (or missing): run \
         `{REGENERATE}=1 cargo test -p membroker-ffi --test header` to regenerate it, and commit it"
    );
}
