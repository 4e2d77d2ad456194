//! What an agent binary must be: it runs as PID 1 of images that may have no C library
//! or dynamic loader at all (a busybox image, a scratch container), so it is static. The
//! image builders check the agent they install, and the tests every binary they put in
//! an image, with this one function.

/// True if `elf` is a 64-bit ELF executable without a program interpreter (`PT_INTERP`),
/// i.e. it runs in an image that has no dynamic loader.
pub fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o| field::<2>(elf, o).map(u16::from_le_bytes);
    let u32_at = |o| field::<4>(elf, o).map(u32::from_le_bytes);
    let u64_at = |o| field::<8>(elf, o).map(u64::from_le_bytes);
    // 64-bit, little-endian, x86-64.
    if !elf.starts_with(b"\x7fELF\x02\x01") || u16_at(0x12) != Some(62) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff.checked_add(i * usize::from(phentsize));
        matches!(at.and_then(u32_at), Some(t) if t != PT_INTERP)
    })
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
        assert!(is_static_elf(&busybox), "Debian's busybox-static is static");
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(!is_static_elf(&sh), "/bin/sh is dynamically linked");
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(b"\x7fELF\x02\x01"));
    }
}
