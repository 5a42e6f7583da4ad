//! `mb-shim-helper`: makes QEMU's guest-RAM system calls so the preload shim can be tested
//! without QEMU. Run under `LD_PRELOAD=libmembroker_preload.so`; it reads one command per line
//! on stdin and answers one line on stdout (`ok …` or `err …`):
//!
//! ```text
//! alloc SIZE                 QEMU's qemu_ram_mmap: PROT_NONE reservation of SIZE + 2M, then a
//!                            MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS RW activation inside it, head
//!                            and tail trims, one guard page   -> ok INDEX ADDR
//! anon SIZE                  a plain private anonymous mapping  -> ok INDEX ADDR
//! memfd NAME SIZE [hugetlb]  QEMU's memory-backend-memfd: memfd_create(NAME, CLOEXEC|
//!                            ALLOW_SEALING [| HUGETLB]), ftruncate64, F_ADD_SEALS GROW|SHRINK|
//!                            SEAL, then a PROT_NONE reservation of SIZE + the fd's page size
//!                            and a MAP_SHARED|MAP_FIXED RW mapping of the fd at its first
//!                            aligned address -> ok INDEX ADDR FD-LINK (`free` closes the fd)
//! fill I OFF LEN BYTE        memset                                 -> ok
//! sum I OFF LEN              sum of the bytes                       -> ok SUM
//! madvise I OFF LEN ADVICE   ADVICE: dontneed | remove | free | hugepage | mergeable -> ok RET ERRNO
//! remap I OFF                QEMU's qemu_ram_remap: 4K MAP_FIXED anonymous page -> ok
//! free I                     munmap(addr, size + 4096) like object_del -> ok RET
//! handler                    install the helper's own SA_SIGINFO SIGBUS handler -> ok
//! handler-signal             install a plain SIGBUS handler with signal(3) -> ok old-was-ours|old X
//!                            (the code it then reports is -1)
//! default                    signal(SIGBUS, SIG_DFL) -> ok
//! query                      is sigaction(SIGBUS, NULL, &old)'s handler the helper's? -> ok yes|no
//! sigbus I OFF CODE LSB      rt_tgsigqueueinfo(SIGBUS) to this thread with si_addr inside
//!                            block I -> ok CALLS SIGNO CODE ADDR (what the handler saw)
//! mbind I POLICY [NODES]     QEMU's binding of a memory backend: mbind(block, POLICY =
//!                            default|preferred|bind|interleave, NODES = 1 or 0,1,
//!                            MPOL_MF_STRICT|MPOL_MF_MOVE) via libnuma's symbol -> ok RET ERRNO
//! nodes I                    write every 4K page of block I, then move_pages(2) status:
//!                            -> ok NODE:PAGES ... (negative NODE: an errno)
//! numa_maps I                block I's line of /proc/self/numa_maps -> ok LINE
//! bench N                    N mmap+munmap pairs of 64 KiB anonymous memory -> ok NS_PER_PAIR
//! bench-einval N             N mmap calls the kernel refuses at once (EINVAL) -> ok NS_PER_CALL
//! exit
//! ```
//!
//! It calls `libc::mmap` and friends (through the PLT), so the shim sees every call.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};

use libc::{c_int, c_void, siginfo_t};

const ALIGN: usize = 2 << 20;
const PAGE: usize = 4096;
/// `statfs.f_type` of hugetlbfs.
const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;

static HANDLER_CALLS: AtomicU32 = AtomicU32::new(0);
static HANDLER_SIGNO: AtomicI32 = AtomicI32::new(0);
static HANDLER_CODE: AtomicI32 = AtomicI32::new(0);
static HANDLER_ADDR: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus_plain(sig: c_int) {
    HANDLER_SIGNO.store(sig, Ordering::SeqCst);
    HANDLER_CODE.store(-1, Ordering::SeqCst);
    HANDLER_ADDR.store(0, Ordering::SeqCst);
    HANDLER_CALLS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_sigbus(sig: c_int, info: *mut siginfo_t, _ctx: *mut c_void) {
    HANDLER_SIGNO.store(sig, Ordering::SeqCst);
    if !info.is_null() {
        // SAFETY: the kernel (or the shim, chaining) passes a valid siginfo.
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        HANDLER_CODE.store(code, Ordering::SeqCst);
        HANDLER_ADDR.store(addr, Ordering::SeqCst);
    }
    HANDLER_CALLS.fetch_add(1, Ordering::SeqCst);
}

#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
    /// The memfd of a `memfd` block, closed by `free`.
    fd: Option<c_int>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// QEMU 7.2's `qemu_ram_mmap` for anonymous RAM.
fn qemu_ram_mmap(size: usize) -> Result<usize, String> {
    let total = size + ALIGN;
    // SAFETY: a fresh PROT_NONE reservation replaces nothing.
    let r = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(format!("reserve errno {}", errno()));
    }
    let r = r as usize;
    let a = (r + ALIGN - 1) & !(ALIGN - 1);
    // SAFETY: inside our own reservation.
    let p = unsafe {
        libc::mmap(
            a as *mut c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = errno();
        // SAFETY: our reservation.
        unsafe { libc::munmap(r as *mut c_void, total) };
        return Err(format!("activate errno {e}"));
    }
    if a > r {
        // SAFETY: head of our reservation.
        unsafe { libc::munmap(r as *mut c_void, a - r) };
    }
    let guard_end = a + size + PAGE;
    if r + total > guard_end {
        // SAFETY: tail of our reservation, after the guard page.
        unsafe { libc::munmap(guard_end as *mut c_void, r + total - guard_end) };
    }
    Ok(a)
}

/// QEMU 7.2's `qemu_memfd_create` for a memory backend (`seal=on`), then `file_ram_alloc`'s
/// `qemu_ram_mmap` with the fd (`share=on`): returns the fd and the mapping.
fn qemu_memfd_backend(
    name: &std::ffi::CStr,
    size: usize,
    flags: libc::c_uint,
) -> Result<(c_int, usize), String> {
    let flags = flags | libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(format!("memfd_create errno {}", errno()));
    }
    let fail = |what: &str| {
        let e = errno();
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
        Err(format!("{what} errno {e}"))
    };
    // SAFETY: our own fd.
    if unsafe { libc::ftruncate64(fd, size as i64) } != 0 {
        return fail("ftruncate");
    }
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: our own fd; F_ADD_SEALS takes an int.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
        return fail("F_ADD_SEALS");
    }
    // qemu_fd_getpagesize: a hugetlbfs file's block size, else the base page size.
    // SAFETY: statfs is plain data, filled in by fstatfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: our own fd and a valid statfs.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return fail("fstatfs");
    }
    let page = if st.f_type == HUGETLBFS_MAGIC {
        st.f_bsize as usize
    } else {
        PAGE
    };
    // SAFETY: a fresh PROT_NONE reservation replaces nothing.
    let r = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size + page,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return fail("reserve");
    }
    let a = (r as usize).next_multiple_of(page);
    // SAFETY: inside our own reservation; the fd is ours.
    let p = unsafe {
        libc::mmap(
            a as *mut c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let out = fail("mmap");
        // SAFETY: our reservation.
        unsafe { libc::munmap(r, size + page) };
        return out;
    }
    Ok((fd, p as usize))
}

/// QEMU 7.2's host_memory_backend_memory_complete: `mbind(ptr, size, policy, host-nodes,
/// maxnode + 1, MPOL_MF_STRICT | MPOL_MF_MOVE)` through libnuma's `mbind` (the shim's, when
/// preloaded; the raw system call when no library defines one).
fn qemu_mbind(b: Block, policy: &str, nodes: &[u32]) -> Result<i64, String> {
    type MbindFn =
        unsafe extern "C" fn(*mut c_void, u64, c_int, *const u64, u64, u32) -> libc::c_long;
    let mode = match policy {
        "default" => 0,
        "preferred" => 1,
        "bind" => 2,
        "interleave" => 3,
        other => return Err(format!("unknown policy {other}")),
    };
    let mut mask = [0u64; 2];
    for &n in nodes {
        *mask.get_mut(n as usize / 64).ok_or("node above 127")? |= 1 << (n % 64);
    }
    let maxnode = nodes.iter().max().map_or(0, |n| u64::from(*n) + 1);
    let mask_ptr = if maxnode == 0 {
        std::ptr::null()
    } else {
        mask.as_ptr()
    };
    const MPOL_MF_STRICT: u32 = 1;
    const MPOL_MF_MOVE: u32 = 2;
    let flags = MPOL_MF_STRICT | MPOL_MF_MOVE;
    // SAFETY: dlopen/dlsym with NUL-terminated names; libnuma may be missing (then the
    // symbol comes from the shim, or not at all).
    let sym = unsafe {
        libc::dlopen(c"libnuma.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        libc::dlsym(libc::RTLD_DEFAULT, c"mbind".as_ptr())
    };
    let r = if sym.is_null() {
        // SAFETY: mbind(2) on our own block with a mask of maxnode bits.
        unsafe {
            libc::syscall(
                libc::SYS_mbind,
                b.addr,
                b.size,
                mode,
                mask_ptr,
                maxnode + 1,
                flags,
            )
        }
    } else {
        // SAFETY: `mbind` has libnuma's signature (the shim's too).
        let f: MbindFn = unsafe { std::mem::transmute::<*mut c_void, MbindFn>(sym) };
        // SAFETY: as above.
        unsafe {
            f(
                b.addr as *mut c_void,
                b.size as u64,
                mode,
                mask_ptr,
                maxnode + 1,
                flags,
            )
        }
    };
    Ok(r)
}

fn arg<T: std::str::FromStr>(words: &[&str], i: usize) -> Result<T, String> {
    let w = words
        .get(i)
        .ok_or_else(|| format!("missing argument {i}"))?;
    let parsed = if let Some(hex) = w.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
            .ok()
            .and_then(|v| v.to_string().parse().ok())
    } else if let Ok(bytes) = membroker_client::size::parse_size(w) {
        bytes.to_string().parse().ok()
    } else {
        w.parse().ok()
    };
    parsed.ok_or_else(|| format!("bad argument {w:?}"))
}

fn block(blocks: &[Block], words: &[&str]) -> Result<Block, String> {
    let i: usize = arg(words, 1)?;
    blocks
        .get(i)
        .copied()
        .ok_or_else(|| format!("no block {i}"))
}

fn range(b: &Block, words: &[&str]) -> Result<(usize, usize), String> {
    let off: usize = arg(words, 2)?;
    let len: usize = arg(words, 3)?;
    if off.checked_add(len).is_none_or(|end| end > b.size) {
        return Err(format!("range {off}+{len} outside block of {}", b.size));
    }
    Ok((b.addr + off, len))
}

fn run(blocks: &mut Vec<Block>, words: &[&str]) -> Result<String, String> {
    match words[0] {
        "alloc" => {
            let size: usize = arg(words, 1)?;
            let addr = qemu_ram_mmap(size)?;
            blocks.push(Block {
                addr,
                size,
                fd: None,
            });
            Ok(format!("{} {addr:#x}", blocks.len() - 1))
        }
        "memfd" => {
            let name = std::ffi::CString::new(*words.get(1).ok_or("missing name")?)
                .map_err(|e| e.to_string())?;
            let size: usize = arg(words, 2)?;
            let hugetlb = match words.get(3) {
                None => 0,
                Some(&"hugetlb") => libc::MFD_HUGETLB,
                Some(other) => return Err(format!("unknown memfd flag {other}")),
            };
            let (fd, addr) = qemu_memfd_backend(&name, size, hugetlb)?;
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map_err(|e| format!("readlink: {e}"))?;
            blocks.push(Block {
                addr,
                size,
                fd: Some(fd),
            });
            Ok(format!("{} {addr:#x} {}", blocks.len() - 1, link.display()))
        }
        "anon" => {
            let size: usize = arg(words, 1)?;
            // SAFETY: a fresh private mapping.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(format!("mmap errno {}", errno()));
            }
            blocks.push(Block {
                addr: p as usize,
                size,
                fd: None,
            });
            Ok(format!("{} {:#x}", blocks.len() - 1, p as usize))
        }
        "fill" => {
            let b = block(blocks, words)?;
            let (addr, len) = range(&b, words)?;
            let byte: u8 = arg(words, 4)?;
            // SAFETY: inside a block this program mapped read-write.
            unsafe { std::ptr::write_bytes(addr as *mut u8, byte, len) };
            Ok(String::new())
        }
        "sum" => {
            let b = block(blocks, words)?;
            let (addr, len) = range(&b, words)?;
            let mut sum = 0u64;
            for i in 0..len {
                // SAFETY: inside a block this program mapped readable.
                sum += u64::from(unsafe { ((addr + i) as *const u8).read_volatile() });
            }
            Ok(sum.to_string())
        }
        "madvise" => {
            let b = block(blocks, words)?;
            let (addr, len) = range(&b, words)?;
            let advice = match *words.get(4).ok_or("missing advice")? {
                "dontneed" => libc::MADV_DONTNEED,
                "remove" => libc::MADV_REMOVE,
                "free" => libc::MADV_FREE,
                "hugepage" => libc::MADV_HUGEPAGE,
                "mergeable" => libc::MADV_MERGEABLE,
                "dontfork" => libc::MADV_DONTFORK,
                other => return Err(format!("unknown advice {other}")),
            };
            // SAFETY: advice on our own mapping.
            let r = unsafe { libc::madvise(addr as *mut c_void, len, advice) };
            Ok(format!("{r} {}", if r == 0 { 0 } else { errno() }))
        }
        "remap" => {
            let b = block(blocks, words)?;
            let off: usize = arg(words, 2)?;
            // SAFETY: QEMU's poison remap: replaces one page of our own block.
            let p = unsafe {
                libc::mmap(
                    (b.addr + off) as *mut c_void,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                Err(format!("mmap errno {}", errno()))
            } else {
                Ok(String::new())
            }
        }
        "mbind" => {
            let b = block(blocks, words)?;
            let nodes: Vec<u32> = match words.get(3) {
                Some(list) => list
                    .split(',')
                    .map(|n| n.parse().map_err(|_| format!("bad node {n:?}")))
                    .collect::<Result<_, _>>()?,
                None => Vec::new(),
            };
            let r = qemu_mbind(b, words.get(2).copied().unwrap_or(""), &nodes)?;
            Ok(format!("{r} {}", if r == 0 { 0 } else { errno() }))
        }
        "nodes" => {
            let b = block(blocks, words)?;
            let pages = b.size / PAGE;
            for i in 0..pages {
                // SAFETY: inside our own read-write block.
                unsafe { std::ptr::write_volatile((b.addr + i * PAGE) as *mut u8, 1) };
            }
            let nodes = membroker_tests::sys::page_nodes(b.addr as *const u8, pages, PAGE)
                .map_err(|e| format!("move_pages: {e}"))?;
            let mut counts = std::collections::BTreeMap::new();
            for n in nodes {
                *counts.entry(n).or_insert(0usize) += 1;
            }
            let counts: Vec<String> = counts.iter().map(|(n, c)| format!("{n}:{c}")).collect();
            Ok(counts.join(" "))
        }
        "numa_maps" => {
            let b = block(blocks, words)?;
            let maps =
                std::fs::read_to_string("/proc/self/numa_maps").map_err(|e| e.to_string())?;
            let prefix = format!("{:x} ", b.addr);
            maps.lines()
                .find(|l| l.starts_with(&prefix))
                .map(str::to_string)
                .ok_or_else(|| format!("no numa_maps line at {:#x}", b.addr))
        }
        "free" => {
            let b = block(blocks, words)?;
            // SAFETY: the block and its guard page are ours; nothing uses them afterwards.
            let r = unsafe { libc::munmap(b.addr as *mut c_void, b.size + PAGE) };
            if let Some(fd) = b.fd {
                // SAFETY: the block's own memfd, used by nothing else.
                unsafe { libc::close(fd) };
            }
            Ok(r.to_string())
        }
        "handler" => {
            // SAFETY: installs a valid SA_SIGINFO handler.
            let r = unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction =
                    on_sigbus as extern "C" fn(c_int, *mut siginfo_t, *mut c_void) as usize;
                act.sa_flags = libc::SA_SIGINFO;
                libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut())
            };
            if r == 0 {
                Ok(String::new())
            } else {
                Err(format!("sigaction errno {}", errno()))
            }
        }
        "handler-signal" => {
            let plain = on_sigbus_plain as extern "C" fn(c_int) as libc::sighandler_t;
            // SAFETY: installs a valid plain handler through signal(3).
            let old = unsafe { libc::signal(libc::SIGBUS, plain) };
            if old == libc::SIG_ERR {
                return Err(format!("signal errno {}", errno()));
            }
            let ours = on_sigbus as extern "C" fn(c_int, *mut siginfo_t, *mut c_void) as usize;
            Ok(if old == ours {
                "old-was-ours".into()
            } else {
                format!("old {old:#x}")
            })
        }
        "default" => {
            // SAFETY: restores the default action (QEMU's sigbus_reraise does this).
            let old = unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
            if old == libc::SIG_ERR {
                Err(format!("signal errno {}", errno()))
            } else {
                Ok(String::new())
            }
        }
        "query" => {
            // SAFETY: a query into a local struct.
            let handler = unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old);
                old.sa_sigaction
            };
            let ours = on_sigbus as extern "C" fn(c_int, *mut siginfo_t, *mut c_void) as usize;
            Ok(if handler == ours {
                "yes".into()
            } else {
                format!("no {handler:#x}")
            })
        }
        "sigbus" => {
            let b = block(blocks, words)?;
            let off: usize = arg(words, 2)?;
            let code: i32 = arg(words, 3)?;
            let lsb: i16 = arg(words, 4)?;
            let before = HANDLER_CALLS.load(Ordering::SeqCst);
            // SAFETY: a zeroed siginfo with the SIGBUS fields set at their kernel offsets
            // (si_addr at 16, si_addr_lsb at 24), queued to this very thread.
            let r = unsafe {
                let mut info: siginfo_t = std::mem::zeroed();
                info.si_signo = libc::SIGBUS;
                info.si_code = code;
                let raw = (&mut info as *mut siginfo_t).cast::<u8>();
                raw.add(16).cast::<usize>().write_unaligned(b.addr + off);
                raw.add(24).cast::<i16>().write_unaligned(lsb);
                libc::syscall(
                    libc::SYS_rt_tgsigqueueinfo,
                    libc::getpid(),
                    libc::syscall(libc::SYS_gettid),
                    libc::SIGBUS,
                    &info as *const siginfo_t,
                )
            };
            if r != 0 {
                return Err(format!("rt_tgsigqueueinfo errno {}", errno()));
            }
            // Delivered on return from the syscall; be patient anyway.
            for _ in 0..1000 {
                if HANDLER_CALLS.load(Ordering::SeqCst) != before {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(format!(
                "{} {} {} {:#x}",
                HANDLER_CALLS.load(Ordering::SeqCst) - before,
                HANDLER_SIGNO.load(Ordering::SeqCst),
                HANDLER_CODE.load(Ordering::SeqCst),
                HANDLER_ADDR.load(Ordering::SeqCst)
            ))
        }
        "bench" => {
            let n: u32 = arg(words, 1)?;
            let len = 64 << 10;
            let start = std::time::Instant::now();
            for _ in 0..n {
                // SAFETY: a fresh private mapping, unmapped at once.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    assert_ne!(p, libc::MAP_FAILED);
                    libc::munmap(p, len);
                }
            }
            Ok(format!(
                "{:.1}",
                start.elapsed().as_nanos() as f64 / f64::from(n.max(1))
            ))
        }
        "bench-einval" => {
            let n: u32 = arg(words, 1)?;
            let start = std::time::Instant::now();
            for _ in 0..n {
                // SAFETY: neither MAP_PRIVATE nor MAP_SHARED: the kernel refuses with EINVAL
                // before doing anything, so this measures the call path alone.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        PAGE,
                        libc::PROT_READ,
                        libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_eq!(p, libc::MAP_FAILED);
            }
            Ok(format!(
                "{:.1}",
                start.elapsed().as_nanos() as f64 / f64::from(n.max(1))
            ))
        }
        other => Err(format!("unknown command {other}")),
    }
}

fn main() {
    let mut blocks = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    println!("ready {}", std::process::id());
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        if words[0] == "exit" {
            break;
        }
        let reply = match run(&mut blocks, &words) {
            Ok(s) if s.is_empty() => "ok".to_string(),
            Ok(s) => format!("ok {s}"),
            Err(e) => format!("err {e}"),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}
