//! The C ABI (`libmembroker_ffi`) as a C program uses it: `ffi/examples/lease.c` and the test
//! driver `tests/ffi/calls.c` are compiled with the system `cc` against
//! `ffi/include/membroker.h` and the built library (shared and static), and run against a real
//! broker. Needs only `cc` (build-essential), which the Rust toolchain needs anyway: a machine
//! without it fails here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use membroker_client::ErrorCode;
use membroker_tests::{Helper, TestBroker, stdout_ok, workspace_library};

/// What the library is built from: rebuilt when any of it is newer.
const SOURCES: &[&str] = &["ffi/src", "client/src"];

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

#[derive(Debug, Clone, Copy)]
enum Link {
    /// `-lmembroker_ffi` against `libmembroker_ffi.so`, found at run time through an rpath.
    Shared,
    /// `libmembroker_ffi.a` linked in.
    Static,
}

/// Compiles `source` (relative to the workspace) with the system `cc` against the header and
/// the library, into `dir`; returns the program.
fn compile(source: &str, link: Link, dir: &Path) -> PathBuf {
    let program = dir.join(format!(
        "{}-{link:?}",
        Path::new(source).file_stem().unwrap().to_string_lossy()
    ));
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c11", "-pthread", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&program)
        .arg("-I")
        .arg(workspace().join("ffi/include"))
        .arg(workspace().join(source));
    match link {
        Link::Shared => {
            let so = workspace_library("membroker-ffi", "libmembroker_ffi.so", SOURCES);
            let lib_dir = so.parent().expect("target/<profile>");
            cmd.arg("-L")
                .arg(lib_dir)
                .arg("-lmembroker_ffi")
                .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
        }
        Link::Static => {
            let archive = workspace_library("membroker-ffi", "libmembroker_ffi.a", SOURCES);
            cmd.arg(archive).arg("-lm");
        }
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run the system C compiler `cc` ({e}): install build-essential")
    });
    assert!(
        out.status.success(),
        "cc {source} ({link:?}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    program
}

/// Runs the example `lease.c`, linked as `link`; `args` is empty for the default socket
/// (`membroker_connect(NULL)` with `$MEMBROKER_SOCKET` set) and default lease name.
fn run_example(link: Link, with_args: bool) {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let program = compile("ffi/examples/lease.c", link, dir.path());
    let name = if with_args {
        "ffi/example"
    } else {
        "example/ram0"
    };
    let mut cmd = Command::new(&program);
    if with_args {
        cmd.arg(broker.socket()).arg(name);
    } else {
        cmd.env("MEMBROKER_SOCKET", broker.socket());
    }
    let out = cmd.output().expect("run the example");
    let stdout = stdout_ok(&out);
    let want = format!(
        "connected\n\
         created {name}: 4194304 bytes, 4096-byte pages, pool t, mode 0600\n\
         wrote 39 bytes at both ends\n\
         read back through a second mapping: hello from C through a membroker lease\n\
         released\n\
         disconnected\n"
    );
    assert_eq!(stdout, want, "example output");
    // Released, disconnected and not persistent: the lease is gone.
    let gone = broker.client().stat(name).expect_err("lease still there");
    assert_eq!(gone.code(), Some(ErrorCode::NotFound), "{gone}");
}

#[test]
fn c_example_linked_against_the_shared_library() {
    run_example(Link::Shared, true);
}

#[test]
fn c_example_linked_statically_on_the_default_socket() {
    run_example(Link::Static, false);
}

/// The lines `helper` prints up to and including `last`, each ending in a newline.
fn lines_through(helper: &mut Helper, last: &str) -> String {
    let mut text = String::new();
    loop {
        let line = helper.line();
        text.push_str(&line);
        text.push('\n');
        if line == last {
            return text;
        }
    }
}

#[test]
fn every_call_and_its_errors_from_c() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let program = compile("tests/ffi/calls.c", Link::Shared, dir.path());
    let missing = broker.dir().join("nobody.sock");
    let mut cmd = Command::new(&program);
    cmd.arg(broker.socket())
        .arg(&missing)
        .stderr(Stdio::inherit());
    let mut c = Helper::spawn(cmd);

    let lease_a = "size=8388608 page_size=4096 pool=t device= mode=0640 persistent=1";
    assert_eq!(
        lines_through(&mut c, "upgrade the broker"),
        format!(
            "before any failure: NULL
connect to nothing: rc=0 errno=ENOENT same=1 error=cannot connect to the broker at {missing}: No such file or directory (os error 2)
connected
NULL handle: rc=-1 errno=EINVAL same=1 error=the membroker handle is NULL
NULL name: rc=-1 errno=EINVAL same=1 error=name is NULL
NULL out: rc=-1 errno=EINVAL same=1 error=out is NULL
missing lease: rc=-1 errno=ENOENT same=1 error=lease ffi/missing: no such lease
bad page size: rc=-1 errno=EINVAL same=1 error=page size 12345: use 4096, 2097152 (2 MiB), 1073741824 (1 GiB), or 0 for the pool's
unknown pool: rc=-1 errno=EINVAL same=1 error=lease ffi/a: no pool named \"nopool\"; pools: t (4K pages)
created: {lease_a} writable=1 state=1 holders=1 poison_ranges=0
create again: rc=-1 errno=EEXIST same=1 error=lease ffi/a: already exists
report poison: 0
poison outside: rc=-1 errno=EINVAL same=1 error=lease ffi/a: poison range 8388608+4096 is outside its 8388608 bytes
poison ranges: 1 1 [4096+4096]
ranges into NULL: rc=-1 errno=EINVAL same=1 error=out is NULL
stat: {lease_a} writable=0 state=1 holders=1 poison_ranges=1
4 threads on one handle: ok
open b before it exists: rc=-1 errno=ENOENT same=1 error=lease ffi/b: no such lease
created b: fd
lost before: 0
reconnect needed before: 0
upgrade the broker
",
            missing = missing.display()
        )
    );

    // The upgrade keeps both leases but closes the C program's connection; ffi/b then goes
    // before the program re-attaches.
    stdout_ok(&broker.run_cli(&["upgrade"]));
    broker.client().remove("ffi/b").expect("remove ffi/b");
    let stdin = c.child.stdin.as_mut().expect("stdin");
    writeln!(stdin, "go").expect("write to the C program");

    assert_eq!(
        lines_through(&mut c, "done"),
        format!(
            "reconnect needed after: 1
same socket fd: 1
lost: ffi/b writable=1 errno=ENOENT reason=lease ffi/b: no such lease
lost after: 0
stat after upgrade: {lease_a} writable=0 state=1 holders=1 poison_ranges=1
reconnect now: 0
no transparent reconnect: 0
release: 0
release again: rc=-1 errno=ENOENT same=1 error=lease ffi/a: this connection does not hold it
remove: 0
stat removed: rc=-1 errno=ENOENT same=1 error=lease ffi/a: no such lease
done
"
        )
    );
    let status = c.child.wait().expect("wait for the C program");
    assert!(status.success(), "the C program exited with {status}");
    assert!(broker.client().list("").unwrap().is_empty(), "leases left");
}
