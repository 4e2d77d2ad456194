//! Tiny ELF "kernels" for the direct path: a few bytes of 64-bit code that `kiln run`
//! loads like a vmlinux (at 16 MiB, so the VM needs more memory than that, entered in long
//! mode) and that reset the VM through the i8042 — straight away, optionally after marking
//! boot done and printing a line, or after a stream of counted port writes.
//!
//! It lets `kiln run` itself, end to end, be tested and benchmarked on a /dev/kvm that
//! cannot boot Linux.

/// Where the segment is loaded (and where a vmlinux is loaded).
const LOAD_ADDR: u64 = 0x100_0000;
const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;

/// How the tiny guest ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Reset through the i8042: `kiln run` exits 0.
    Reset,
    /// Spin forever: the VM runs until the host stops it.
    Spin,
}

/// Machine code for the guest: print `message` on COM1, write the boot-done mark, then end.
fn code(message: &str, end: End) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in message.bytes() {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    let port = kiln_agent_marks::SIGNAL_PORT.to_le_bytes();
    code.extend_from_slice(&[0x66, 0xba, port[0], port[1]]); // mov dx, SIGNAL_PORT
    code.extend_from_slice(&[0xb0, kiln_agent_marks::BOOT_DONE, 0xee]); // mov al, BOOT_DONE; out dx, al
    if end == End::Reset {
        code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    }
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    code
}

/// Constants of the guest-signal port, as `kiln_agent::marks` defines them (kept in sync by
/// the `marks_match_the_agent` test in kiln's own tests).
pub mod kiln_agent_marks {
    pub const SIGNAL_PORT: u16 = 0x0440;
    pub const BOOT_DONE: u8 = 0x01;
}

/// An ELF64 x86-64 executable with one PT_LOAD segment holding the code above; it resets.
pub fn build(message: &str) -> Vec<u8> {
    build_with(message, End::Reset)
}

/// As [`build`], ending as `end` says.
pub fn build_with(message: &str, end: End) -> Vec<u8> {
    elf(&code(message, end))
}

/// A guest that writes the low byte of a counter 0, 1, 2, … to COM1, `count` times, then
/// resets: every exit but the last is a port write, and what it prints shows whether any
/// write was repeated or lost (see [`counting_output`]).
pub fn counting(count: u32) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.extend_from_slice(&[0x31, 0xc0]); // xor eax, eax
    code.push(0xee); // loop: out dx, al
    code.extend_from_slice(&[0xff, 0xc0]); // inc eax
    code.push(0x3d); // cmp eax, count
    code.extend_from_slice(&count.to_le_bytes());
    code.extend_from_slice(&[0x75, 0xf6]); // jne loop
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    elf(&code)
}

/// What [`counting`]`(count)` prints.
pub fn counting_output(count: u32) -> Vec<u8> {
    (0..count).map(|i| i.to_le_bytes()[0]).collect()
}

/// An ELF64 x86-64 executable that `kiln run --kernel` loads at 16 MiB and enters in long
/// mode (the first 4 GiB identity-mapped) at the first byte of `code`: any hand-made guest.
pub fn elf(code: &[u8]) -> Vec<u8> {
    let code_offset = EHDR_SIZE + PHDR_SIZE;
    let file_size = code_offset + code.len() as u64;
    let mut elf = Vec::with_capacity(usize::try_from(file_size).unwrap_or(0));
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(LOAD_ADDR + code_offset).to_le_bytes()); // e_entry
    elf.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                                // Program header: PT_LOAD, R+X, the whole file at LOAD_ADDR.
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&file_size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&file_size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(code);
    elf
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_an_elf_with_entry_past_the_headers() {
        let elf = super::build("hi\n");
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, 0x100_0000 + 120);
        assert_eq!(elf[120..124], [0x66, 0xba, 0xf8, 0x03]);
    }
}
