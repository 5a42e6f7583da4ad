//! Running the guest: real mode at [`guest::CODE`] until it halts.

use std::time::Duration;

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::Error;
use crate::guest::{self, Line};
use crate::sys::Machine;

/// How long the guest may run before the VMM gives up on it.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Loads the program into `memory`, runs it on one vCPU until `hlt`, and returns the line
/// it wrote after checking it against the counter it stored.
pub fn run(memory: GuestMemoryMmap) -> Result<Line, Error> {
    memory.write_slice(&guest::PROGRAM, GuestAddress(guest::CODE))?;
    memory.write_slice(guest::PREFIX, GuestAddress(guest::TEXT))?;
    memory.write_slice(&[0; guest::LINE_MAX], GuestAddress(guest::LINE))?;

    let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
    let mut machine = Machine::new(&kvm, memory)?;
    let vcpu = machine.vcpu();
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
    regs.rip = guest::CODE;
    regs.rflags = 0x2; // bit 1 is reserved and always set; interrupts off
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;

    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(exit) => {
                let exit = format!("{exit:?}");
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                return Err(Error::Guest(format!(
                    "unexpected vCPU exit {exit} at rip {rip:#x}"
                )));
            }
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => continue,
            Err(e) => return Err(Error::kvm("KVM_RUN")(e)),
        }
    }

    let memory = machine.memory();
    let mut line = [0u8; guest::LINE_MAX];
    memory.read_slice(&mut line, GuestAddress(guest::LINE))?;
    let line = guest::parse_line(&line).map_err(Error::Guest)?;
    let stored: u32 = memory.read_obj(GuestAddress(guest::COUNTER))?;
    if stored != line.counter {
        return Err(Error::Guest(format!(
            "the guest wrote {line:?} but stored counter {stored}"
        )));
    }
    Ok(line)
}
