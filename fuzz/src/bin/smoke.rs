//! Runs every fuzz target on stable Rust, without libFuzzer: first the seed corpus
//! (`corpus/<target>/`), then N inputs mutated from it by a seeded PRNG.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --release --bin smoke -- [N] [--target NAME]...
//!     [--seed S] [--secs SECS] [--corpus DIR]
//! ```
//! N defaults to 10000 per target; `--secs` stops each target after that long instead (whichever
//! comes first). A panicking input is written to `artifacts/<target>/crash-<hash>` and the run
//! exits with status 1 after finishing the other targets. A target stops at its first panic,
//! unless `--keep-going`: then it goes on and reports each distinct panic location once (to look
//! past a known bug).

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use membroker_fuzz::mutate::{Rng, mutate};
use membroker_fuzz::{TARGETS, Target, input, target};

#[derive(Debug)]
struct Args {
    n: u64,
    targets: Vec<Target>,
    seed: u64,
    secs: Option<f64>,
    corpus: PathBuf,
    keep_going: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: smoke [N] [--target NAME]... [--seed S] [--secs SECS] [--corpus DIR] \
         [--keep-going]\ntargets: {}",
        TARGETS.map(|t| t.name).join(", ")
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = Args {
        n: 10_000,
        targets: Vec::new(),
        seed: 0,
        secs: None,
        corpus: here.join("corpus"),
        keep_going: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--target" => {
                let name = value();
                args.targets.push(target(&name).unwrap_or_else(|| usage()));
            }
            "--seed" => args.seed = value().parse().unwrap_or_else(|_| usage()),
            "--secs" => args.secs = Some(value().parse().unwrap_or_else(|_| usage())),
            "--corpus" => args.corpus = value().into(),
            "--keep-going" => args.keep_going = true,
            "-h" | "--help" => usage(),
            n => args.n = n.parse().unwrap_or_else(|_| usage()),
        }
    }
    if args.targets.is_empty() {
        args.targets = TARGETS.to_vec();
    }
    args
}

/// Where and why the last panic happened, from the panic hook.
static LAST_PANIC: Mutex<Option<(String, String)>> = Mutex::new(None);

/// A panic hook that records the panic instead of printing it (printed once per location).
fn record_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map_or_else(
            || "unknown".to_string(),
            |l| format!("{}:{}", l.file(), l.line()),
        );
        let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(no message)".to_string()
        };
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some((location, message));
    }));
}

/// A panic seen while running a target.
#[derive(Debug)]
struct Crash {
    message: String,
    count: u64,
    saved: PathBuf,
}

/// Counts a panic; prints it the first time its location is seen.
fn note(
    crashes: &mut BTreeMap<String, Crash>,
    target: &str,
    (location, message, saved): (String, String, PathBuf),
) {
    let crash = crashes.entry(location.clone()).or_insert_with(|| {
        eprintln!(
            "{target}: panic at {location}: {message}\n  input saved to {}",
            saved.display()
        );
        Crash {
            message,
            count: 0,
            saved,
        }
    });
    crash.count += 1;
}

/// Runs one input: whether it was accepted, or on a panic, where it was and the saved input.
fn run_one(target: &Target, data: &[u8]) -> Result<bool, (String, String, PathBuf)> {
    if let Ok(accepted) = catch_unwind(AssertUnwindSafe(|| (target.run)(data))) {
        return Ok(accepted);
    }
    let (location, message) = LAST_PANIC
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_else(|| ("unknown".into(), "(no message)".into()));
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("artifacts")
        .join(target.name);
    let path = dir.join(format!("crash-{:016x}", h.finish()));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, data)) {
        eprintln!("cannot save the crashing input to {}: {e}", path.display());
    }
    Err((location, message, path))
}

fn main() -> ExitCode {
    let args = parse_args();
    record_panics();
    let mut failed = false;
    for t in &args.targets {
        let started = Instant::now();
        let dir = args.corpus.join(t.name);
        let seeds: Vec<Vec<u8>> = match input::files(&dir) {
            Ok(files) if dir.is_dir() => files
                .iter()
                .map(|f| std::fs::read(f).expect("corpus file reads"))
                .collect(),
            _ => {
                eprintln!(
                    "{}: no corpus at {}, starting from random bytes",
                    t.name,
                    dir.display()
                );
                Vec::new()
            }
        };
        let mut crashes: BTreeMap<String, Crash> = BTreeMap::new();
        let deadline = args.secs.map(|s| started + Duration::from_secs_f64(s));
        let mut rng = Rng::new(args.seed ^ t.name.len() as u64);
        let (mut runs, mut accepted) = (0u64, 0u64);
        for seed in &seeds {
            if let Err(crash) = run_one(t, seed) {
                note(&mut crashes, t.name, crash);
            }
        }
        while runs < args.n {
            if !crashes.is_empty() && !args.keep_going {
                break;
            }
            if runs % 256 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let data = mutate(&mut rng, &seeds, &t.hints);
            match run_one(t, &data) {
                Ok(a) => accepted += u64::from(a),
                Err(crash) => note(&mut crashes, t.name, crash),
            }
            runs += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{}: {} seeds + {runs} mutated inputs ({:.1}% accepted) in {secs:.1} s ({:.0}/s), \
             seed {}: {}",
            t.name,
            seeds.len(),
            100.0 * accepted as f64 / runs.max(1) as f64,
            runs as f64 / secs.max(1e-9),
            args.seed,
            if crashes.is_empty() {
                "no failure".to_string()
            } else {
                format!("FAILED at {} location(s)", crashes.len())
            }
        );
        for (location, c) in &crashes {
            println!(
                "  {location}: {} ({} inputs), e.g. {}",
                c.message,
                c.count,
                c.saved.display()
            );
        }
        failed |= !crashes.is_empty();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
