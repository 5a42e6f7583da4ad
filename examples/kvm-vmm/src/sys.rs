//! The example's only unsafe code: telling KVM where guest memory lives.
#![allow(unsafe_code)]

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::Error;

/// A VM with one vCPU whose guest memory is `memory`. Fields drop in order: the vCPU and the
/// VM (and with them KVM's memory slots) go before the mappings the slots point into.
#[derive(Debug)]
pub struct Machine {
    vcpu: VcpuFd,
    /// Kept open for as long as the slots are in use.
    _vm: VmFd,
    memory: GuestMemoryMmap,
}

impl Machine {
    /// Creates a VM on `kvm`, registers every region of `memory` as a memory slot (the
    /// regions must be writable mappings), and creates vCPU 0.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Machine, Error> {
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        for (slot, region) in memory.iter().enumerate() {
            let slot = kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("fewer than 2^32 regions"),
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: `userspace_addr` and `memory_size` describe a live mapping owned by
            // `memory`, which the returned value keeps until after the VM and its vCPU are
            // closed (field order); on error the VM is closed here, before `memory`.
            unsafe { vm.set_user_memory_region(slot) }
                .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        Ok(Machine {
            vcpu,
            _vm: vm,
            memory,
        })
    }

    pub fn vcpu(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}
