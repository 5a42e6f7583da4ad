//! Test helper for the crash torture (`tests/tests/restart.rs`): one client process running a
//! seeded storm of create / open / write / release / rm on leases named `PREFIX/N`, surviving
//! broker kills by reconnecting and re-attaching what it holds.
//!
//! ```text
//! mb-storm SOCKET PREFIX SEED [PAGE]
//! ```
//! Lease sizes are 1..=32 pages of 4 KiB, or 1..=8 pages of PAGE bytes when given (a device-dax
//! pool wants multiples of 2 MiB).
//! stdin, one command a line: `pause` (finish the current step, make sure the broker is
//! reachable and every held lease re-attached, print `paused`, wait), `resume`, `stop`.
//!
//! stdout, one event a line, printed only once true (so the test can build a model):
//! ```text
//! send-create NAME SIZE PERSISTENT MODE   the create is on its way: NAME may or may not exist
//! created NAME SIZE PERSISTENT MODE CK    acknowledged (or found after a crash and adopted)
//! absent NAME                             an unacknowledged create did not happen
//! wrote NAME CK                           the write is complete; CK is the lease's checksum
//! send-release NAME / released NAME       release sent / acknowledged
//! send-rm NAME / removed NAME             rm sent / acknowledged (or found done)
//! reattached N                            reconnected; N held leases opened again
//! lost NAME WHY                           a held or idle lease could not be opened again
//! changed NAME                            re-attaching gave another memfd than the one held
//! paused
//! ```
//! CK is FNV-1a 64 over the lease's bytes, as read back through the mapping.

use membroker_tests::Rng;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use membroker_client::{Client, CreateLease, Error, ErrorCode, Lease, Mapping};

/// Most leases one worker has at a time.
const MAX_LEASES: usize = 6;
/// Largest lease, in 4 KiB pages.
const MAX_PAGES: u64 = 32;
/// How long a worker waits for the broker to come back before it gives up.
const RECONNECT_LIMIT: Duration = Duration::from_secs(30);

/// FNV-1a, 64 bits.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Mine {
    size: u64,
    persistent: bool,
    /// The fd and mapping while this worker holds the lease.
    held: Option<(Lease, Mapping)>,
}

struct Storm {
    socket: String,
    prefix: String,
    client: Client,
    rng: Rng,
    /// Lease sizes are multiples of this.
    page: u64,
    mine: BTreeMap<String, Mine>,
    next: u64,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A refusal by the broker (as opposed to a broken connection).
fn refused(e: &Error) -> Option<ErrorCode> {
    e.code()
}

fn connect(socket: &str) -> Client {
    let deadline = Instant::now() + RECONNECT_LIMIT;
    loop {
        match Client::connect(socket) {
            Ok(mut client) => {
                // This helper handles broken connections itself, so that it knows exactly
                // which requests were acknowledged.
                client.set_reconnect_timeout(Duration::ZERO);
                return client;
            }
            Err(e) if Instant::now() > deadline => {
                say(&format!("error cannot reconnect: {e}"));
                std::process::exit(1);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn read_all(map: &Mapping) -> Vec<u8> {
    let mut data = vec![0u8; map.len()];
    map.read_at(0, &mut data).expect("read the lease");
    data
}

impl Storm {
    /// Reconnects and re-attaches every held lease (except `skip`); loops over further kills.
    fn recover(&mut self, skip: Option<&str>) {
        'again: loop {
            self.client = connect(&self.socket);
            let names: Vec<String> = self
                .mine
                .iter()
                .filter(|(n, m)| m.held.is_some() && Some(n.as_str()) != skip)
                .map(|(n, _)| n.clone())
                .collect();
            for name in &names {
                match self.client.open(name, true) {
                    Ok(again) => {
                        let (held, _) = self.mine[name].held.as_ref().expect("held");
                        let before = rustix::fs::fstat(held.as_fd()).expect("fstat");
                        let after = rustix::fs::fstat(again.as_fd()).expect("fstat");
                        if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino) {
                            say(&format!("changed {name}"));
                        }
                    }
                    Err(e) => match refused(&e) {
                        Some(code) => {
                            say(&format!("lost {name} {code:?}: {e}"));
                            self.mine.remove(name);
                        }
                        None => continue 'again,
                    },
                }
            }
            say(&format!("reattached {}", names.len()));
            return;
        }
    }

    fn held_names(&self) -> Vec<String> {
        let it = self.mine.iter().filter(|(_, m)| m.held.is_some());
        it.map(|(n, _)| n.clone()).collect()
    }

    fn idle_names(&self) -> Vec<String> {
        let it = self.mine.iter().filter(|(_, m)| m.held.is_none());
        it.map(|(n, _)| n.clone()).collect()
    }

    fn pick(&mut self, names: &[String]) -> Option<String> {
        if names.is_empty() {
            return None;
        }
        Some(names[self.rng.below(names.len() as u64) as usize].clone())
    }

    fn create(&mut self) {
        self.next += 1;
        let name = format!("{}/{}", self.prefix, self.next);
        let size = if self.page == 4096 {
            (1 + self.rng.below(MAX_PAGES)) * 4096
        } else {
            (1 + self.rng.below(8)) * self.page
        };
        let persistent = self.rng.below(5) != 0;
        let mode = if self.rng.below(2) == 0 { 0o600 } else { 0o640 };
        say(&format!(
            "send-create {name} {size} {} {mode:o}",
            u8::from(persistent)
        ));
        let req = CreateLease::new(&name, size)
            .persistent(persistent)
            .mode(mode);
        let lease = match self.client.create(req) {
            Ok(lease) => lease,
            Err(e) if refused(&e).is_some() => {
                say(&format!("absent {name}"));
                return;
            }
            Err(_) => {
                // Unacknowledged: find out whether the broker applied it before it died.
                self.recover(None);
                match self.resolve_create(&name) {
                    Some(lease) => lease,
                    None => {
                        say(&format!("absent {name}"));
                        return;
                    }
                }
            }
        };
        let map = lease.map().expect("map a new lease");
        let ck = checksum(&read_all(&map));
        say(&format!(
            "created {name} {size} {} {mode:o} {ck}",
            u8::from(persistent)
        ));
        self.mine.insert(
            name,
            Mine {
                size,
                persistent,
                held: Some((lease, map)),
            },
        );
    }

    /// After a crash: is the lease of an unacknowledged create there? Then hold it.
    fn resolve_create(&mut self, name: &str) -> Option<Lease> {
        loop {
            match self.client.open(name, true) {
                Ok(lease) => return Some(lease),
                Err(e) if refused(&e) == Some(ErrorCode::NotFound) => return None,
                Err(e) if refused(&e).is_some() => {
                    say(&format!("error open {name} after a crash: {e}"));
                    return None;
                }
                Err(_) => self.recover(None),
            }
        }
    }

    fn write(&mut self, name: &str) {
        let seed = self.rng.next_u64();
        let Some((_, map)) = self.mine[name].held.as_ref() else {
            return;
        };
        let data: Vec<u8> = (0..map.len())
            .map(|i| membroker_tests::pattern(seed as u8, i ^ (seed as usize >> 8)))
            .collect();
        map.write_at(0, &data).expect("write the lease");
        let ck = checksum(&read_all(map));
        say(&format!("wrote {name} {ck}"));
    }

    fn open(&mut self, name: &str) {
        loop {
            match self.client.open(name, true) {
                Ok(lease) => {
                    let map = lease.map().expect("map an opened lease");
                    if let Some(mine) = self.mine.get_mut(name) {
                        assert_eq!(lease.size(), mine.size, "{name}: size");
                        mine.held = Some((lease, map));
                    }
                    return;
                }
                Err(e) => match refused(&e) {
                    Some(code) => {
                        say(&format!("lost {name} {code:?}: {e}"));
                        self.mine.remove(name);
                        return;
                    }
                    None => self.recover(None),
                },
            }
        }
    }

    fn release(&mut self, name: &str) {
        say(&format!("send-release {name}"));
        match self.client.release(name) {
            Ok(()) => say(&format!("released {name}")),
            Err(e) if refused(&e).is_some() => say(&format!("error release {name}: {e}")),
            // Unacknowledged; the old connection (and with it this holder) is gone anyway.
            Err(_) => self.recover(Some(name)),
        }
        let persistent = self.mine.get(name).is_some_and(|m| m.persistent);
        if persistent {
            if let Some(mine) = self.mine.get_mut(name) {
                mine.held = None;
            }
        } else {
            self.mine.remove(name);
        }
    }

    fn remove(&mut self, name: &str) {
        say(&format!("send-rm {name}"));
        loop {
            match self.client.remove(name) {
                Ok(()) => break,
                Err(e) if refused(&e) == Some(ErrorCode::NotFound) => break,
                Err(e) if refused(&e).is_some() => {
                    say(&format!("error rm {name}: {e}"));
                    break;
                }
                Err(_) => self.recover(None),
            }
        }
        say(&format!("removed {name}"));
        self.mine.remove(name);
    }

    fn step(&mut self) {
        let roll = self.rng.below(100);
        let held = self.held_names();
        let idle = self.idle_names();
        match roll {
            0..25 if self.mine.len() < MAX_LEASES => self.create(),
            0..55 => {
                if let Some(name) = self.pick(&held) {
                    self.write(&name);
                }
            }
            55..65 => {
                if let Some(name) = self.pick(&idle) {
                    self.open(&name);
                }
            }
            65..80 => {
                if let Some(name) = self.pick(&held) {
                    self.release(&name);
                }
            }
            80..92 => match self.pick(&idle) {
                Some(name) => self.remove(&name),
                None => {
                    if let Some(name) = self.pick(&held) {
                        self.release(&name);
                    }
                }
            },
            _ => {
                if let Err(e) = self.client.df()
                    && refused(&e).is_none()
                {
                    self.recover(None);
                }
                std::thread::sleep(Duration::from_micros(self.rng.below(500)));
            }
        }
    }

    /// Makes sure the broker is reachable and every held lease re-attached.
    fn settle(&mut self) {
        loop {
            match self.client.df() {
                Ok(_) => return,
                Err(e) if refused(&e).is_some() => return,
                Err(_) => self.recover(None),
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (socket, prefix, seed, page) = match &args[..] {
        [_, socket, prefix, seed] => (socket, prefix, seed, 4096),
        [_, socket, prefix, seed, page] => {
            (socket, prefix, seed, page.parse().expect("PAGE in bytes"))
        }
        _ => {
            eprintln!("usage: mb-storm SOCKET PREFIX SEED [PAGE]");
            std::process::exit(2);
        }
    };
    let seed: u64 = seed.parse().expect("seed");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        let _ = tx.send("stop".into());
    });
    let mut storm = Storm {
        client: connect(socket),
        socket: socket.clone(),
        prefix: prefix.clone(),
        rng: Rng(seed),
        page,
        mine: BTreeMap::new(),
        next: 0,
    };
    loop {
        match rx.try_recv().ok().as_deref() {
            Some("pause") => {
                storm.settle();
                say("paused");
                match rx.recv().as_deref() {
                    Ok("resume") => {}
                    _ => return,
                }
            }
            Some("stop") => return,
            _ => storm.step(),
        }
    }
}
