//! The logic of membroker's fuzz targets, as plain functions of a byte slice.
//!
//! Each function panics on a bug (that is what the fuzzer looks for) and returns normally for any
//! input the code under test handles correctly, accepted or refused. The libFuzzer targets in
//! `fuzz_targets/` and the stable-Rust runner `src/bin/smoke.rs` both call these.

pub mod codec;
pub mod extents;
pub mod input;
pub mod journal;
pub mod mutate;

/// One fuzz target: its name (the cargo-fuzz target and the corpus folder) and its function.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    /// Panics on a bug; returns whether the input got past the cheap checks (decoded, opened,
    /// allocated), for the stable runner's statistics.
    pub run: fn(&[u8]) -> bool,
    /// What the stable runner's mutator knows about the input format.
    pub hints: mutate::Hints,
}

/// Every target, in the order the smoke runner runs them.
pub const TARGETS: [Target; 4] = [
    Target {
        name: "codec_request",
        run: codec::request,
        hints: mutate::Hints {
            max_len: 4096,
            dict: mutate::CODEC_DICT,
            fixup: Some(mutate::fix_codec_header),
        },
    },
    Target {
        name: "codec_response",
        run: codec::response,
        hints: mutate::Hints {
            max_len: 4096,
            dict: mutate::CODEC_DICT,
            fixup: Some(mutate::fix_codec_header),
        },
    },
    Target {
        name: "journal_replay",
        run: journal::replay,
        hints: mutate::Hints {
            max_len: 4096,
            dict: mutate::JOURNAL_DICT,
            fixup: None,
        },
    },
    Target {
        name: "extents_ops",
        run: extents::ops,
        hints: mutate::Hints {
            max_len: 2048,
            dict: &[],
            fixup: None,
        },
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

/// Runs `target` over every file named by `paths` (files, or folders of files): the stable
/// stand-in for a libFuzzer binary, used to reproduce a crash. Returns the number of inputs run.
pub fn replay_paths(target: Target, paths: &[std::path::PathBuf]) -> std::io::Result<usize> {
    let mut n = 0;
    for path in paths {
        for file in input::files(path)? {
            let data = std::fs::read(&file)?;
            eprintln!("{}: {} ({} bytes)", target.name, file.display(), data.len());
            (target.run)(&data);
            n += 1;
        }
    }
    Ok(n)
}

/// `main` of a fuzz target binary: under cargo-fuzz the libFuzzer entry point, otherwise
/// (stable, no libFuzzer) a replayer of the files or folders given as arguments.
#[macro_export]
macro_rules! fuzz_main {
    ($name:literal, $run:path) => {
        #[cfg(fuzzing)]
        libfuzzer_sys::fuzz_target!(|data: &[u8]| {
            $run(data);
        });

        #[cfg(not(fuzzing))]
        fn main() -> std::process::ExitCode {
            let paths: Vec<std::path::PathBuf> =
                std::env::args_os().skip(1).map(Into::into).collect();
            if paths.is_empty() {
                eprintln!(concat!(
                    "usage: ",
                    $name,
                    " FILE|DIR... (built without libFuzzer: replays inputs)"
                ));
                return std::process::ExitCode::from(2);
            }
            let target = $crate::target($name).expect("target is in TARGETS");
            match $crate::replay_paths(target, &paths) {
                Ok(n) => {
                    eprintln!("{}: {n} inputs, no failure", $name);
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", $name);
                    std::process::ExitCode::FAILURE
                }
            }
        }
    };
}
