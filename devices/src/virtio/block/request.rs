//! Parsing and running one request chain (virtio 1.2, 5.2.6).
//!
//! A request is a device-readable 16-byte header (`le32 type, le32 reserved, le64 sector`),
//! data descriptors whose direction the type fixes, and a device-writable status byte, the
//! last byte of the chain. Linux gives header, each data segment and the status their own
//! descriptors; data may also share the header's or the status's descriptor (any framing).
//! Everything is checked before any I/O: descriptor directions, that every buffer lies in
//! guest memory, that lengths add up without overflow and are whole sectors, and that the
//! sector range lies inside the disk. A chain that fails a check completes with
//! `VIRTIO_BLK_S_IOERR` (`VIRTIO_BLK_S_UNSUPP` for an unknown type); one whose status byte
//! cannot be written (missing, device-readable, outside memory, or a broken or looping
//! chain) is returned with used length 0, which is all the device can do.

mod discard;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::consts::*;
use super::disk::Disk;
use super::{BOUNCE_LEN, MAX_REQUEST_LEN, SECTOR_SIZE, SEG_MAX, SERIAL_LEN};
use crate::virtio::GuestMemory;

/// Size of the request header.
const HEADER_LEN: u32 = 16;

/// The status byte values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const _: () = assert!(
    S_OK as u32 == VIRTIO_BLK_S_OK
        && S_IOERR as u32 == VIRTIO_BLK_S_IOERR
        && S_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP
);

/// Why a request did not complete with `VIRTIO_BLK_S_OK`.
#[derive(Debug)]
enum Failure {
    /// `VIRTIO_BLK_S_IOERR`, with the reason for the log.
    IoErr(String),
    /// `VIRTIO_BLK_S_UNSUPP`, with the reason for the log.
    Unsupp(String),
}

fn ioerr(msg: impl Into<String>) -> Failure {
    Failure::IoErr(msg.into())
}

/// What a request runs against.
pub(crate) struct Ctx<'a> {
    pub(crate) disk: &'a mut dyn Disk,
    pub(crate) serial: &'a [u8; SERIAL_LEN],
    /// Whether DISCARD is offered (not on read-only disks).
    pub(crate) discard: bool,
    /// The driver did not negotiate FLUSH: make every write durable before completing it.
    pub(crate) writethrough: bool,
    /// The bounce buffer, grown up to [`BOUNCE_LEN`] and reused.
    pub(crate) scratch: &'a mut Vec<u8>,
    /// Data bytes read and written so far (what a request cost, for the drain's budget).
    pub(crate) moved: u64,
}

/// Run the request in `chain` and write its status. Returns the used length: the bytes
/// written into guest memory (data for IN and GET_ID, plus the status byte), 0 if the
/// status could not be written.
pub(crate) fn handle(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    ctx: &mut Ctx<'_>,
) -> u32 {
    let head = chain.head_index();
    // The iterator stops after the queue size (a loop) or at an unreadable descriptor; then
    // the last one still says "next" and the chain has no trustworthy end.
    let descs: Vec<Descriptor> = chain.collect();
    let status = match descs.last() {
        Some(d) if d.has_next() => Err("the chain is broken or loops"),
        _ if descs.len() < 2 => Err("the chain has no status descriptor"),
        Some(d) if !d.is_write_only() => Err("the status descriptor is device-readable"),
        // The status is the last byte of the chain; Linux gives it a descriptor of its own.
        Some(d) => match d.addr().checked_add(u64::from(d.len()).wrapping_sub(1)) {
            Some(a) if d.len() > 0 && mem.check_range(a, 1) => Ok(a),
            _ => Err("the status descriptor is empty or outside guest memory"),
        },
        None => Err("the chain is empty"),
    };
    let status_addr = match status {
        Ok(a) => a,
        Err(e) => {
            crate::guest_warn!(static, head, "virtio-blk: {e}; chain returned unused");
            return 0;
        }
    };
    let (code, written) = match execute(mem, &descs, ctx) {
        Ok(n) => (S_OK, n),
        Err(Failure::IoErr(e)) => {
            crate::guest_warn!(static, head, "virtio-blk: request failed: {e}");
            (S_IOERR, 0)
        }
        Err(Failure::Unsupp(e)) => {
            crate::guest_warn!(static, head, "virtio-blk: unsupported request: {e}");
            (S_UNSUPP, 0)
        }
    };
    if let Err(e) = mem.write_obj(code, status_addr) {
        crate::guest_warn!(
            static,
            head,
            "virtio-blk: cannot write the status byte: {e}"
        );
        return 0;
    }
    written.saturating_add(1)
}

/// A run of guest memory holding request data: a data descriptor, or what is left of the
/// header or status descriptor besides the header or status.
#[derive(Debug, Clone, Copy)]
struct Piece {
    addr: GuestAddress,
    len: u32,
    /// Device-writable.
    write: bool,
}

impl From<&Descriptor> for Piece {
    fn from(d: &Descriptor) -> Self {
        Piece {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        }
    }
}

/// The data of a chain of at least two descriptors, in order. The driver may put data after
/// the header in its descriptor, or before the status in the last one (virtio 1.2, 2.6.4:
/// the device must not assume a particular arrangement).
fn data_pieces(descs: &[Descriptor]) -> Result<Vec<Piece>, Failure> {
    let (hdr, last) = (descs[0], descs[descs.len() - 1]);
    let mut pieces = Vec::with_capacity(descs.len());
    if hdr.len() > HEADER_LEN {
        let addr = hdr
            .addr()
            .checked_add(u64::from(HEADER_LEN))
            .ok_or_else(|| ioerr("the header descriptor wraps around"))?;
        let len = hdr.len() - HEADER_LEN;
        pieces.push(Piece {
            addr,
            len,
            write: false,
        });
    }
    pieces.extend(descs[1..descs.len() - 1].iter().map(Piece::from));
    if last.len() > 1 {
        pieces.push(Piece {
            addr: last.addr(),
            len: last.len() - 1,
            write: true,
        });
    }
    Ok(pieces)
}

/// Check the header and run the request. Returns the data bytes written into the guest.
fn execute(mem: &GuestMemory, descs: &[Descriptor], ctx: &mut Ctx<'_>) -> Result<u32, Failure> {
    let hdr = descs[0];
    if hdr.is_write_only() {
        return Err(ioerr("the header descriptor is device-writable"));
    }
    if hdr.len() < HEADER_LEN {
        return Err(ioerr(format!(
            "the header descriptor has {} bytes",
            hdr.len()
        )));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, hdr.addr())
        .map_err(|e| ioerr(format!("cannot read the header: {e}")))?;
    let ty = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    let sector = u64::from_le_bytes(sector);
    let pieces = data_pieces(descs)?;
    let data = pieces.as_slice();
    let durable = |disk: &mut dyn Disk, wt: bool| match wt {
        true => disk
            .flush()
            .map_err(|e| ioerr(format!("writethrough flush: {e}"))),
        false => Ok(()),
    };
    match ty {
        VIRTIO_BLK_T_IN => read_write(mem, data, sector, ctx, true),
        VIRTIO_BLK_T_OUT if ctx.disk.is_read_only() => Err(ioerr("write to a read-only disk")),
        VIRTIO_BLK_T_OUT => {
            read_write(mem, data, sector, ctx, false)?;
            durable(ctx.disk, ctx.writethrough).map(|()| 0)
        }
        VIRTIO_BLK_T_FLUSH => ctx
            .disk
            .flush()
            .map(|()| 0)
            .map_err(|e| ioerr(format!("flush: {e}"))),
        VIRTIO_BLK_T_GET_ID => get_id(mem, data, ctx.serial),
        VIRTIO_BLK_T_DISCARD if ctx.discard => {
            discard::discard(mem, data, ctx.disk)?;
            durable(ctx.disk, ctx.writethrough).map(|()| 0)
        }
        _ => Err(Failure::Unsupp(format!("request type {ty}"))),
    }
}

/// Check that the data descriptors all have the direction `writable` and lie in guest
/// memory; returns their total length.
fn check_data(mem: &GuestMemory, data: &[Piece], writable: bool) -> Result<u64, Failure> {
    let mut total = 0u64;
    for d in data {
        if d.write != writable {
            let dir = if writable { "writable" } else { "readable" };
            return Err(ioerr(format!("a data descriptor is not device-{dir}")));
        }
        if !mem.check_range(d.addr, d.len as usize) {
            return Err(ioerr(format!(
                "data buffer {:#x}+{:#x} lies outside guest memory",
                d.addr.0, d.len
            )));
        }
        total = total
            .checked_add(u64::from(d.len))
            .ok_or_else(|| ioerr("data length overflows"))?;
    }
    Ok(total)
}

/// The size cap of a read or write: at most [`MAX_REQUEST_LEN`] bytes in at most
/// [`SEG_MAX`] segments, checked before any byte is read, so that one request cannot hold
/// the event loop for gigabytes of I/O. (A segment longer than the advertised `size_max` is
/// tolerated: the total is what bounds the work.)
fn check_size(data: &[Piece], total: u64) -> Result<(), Failure> {
    if total > MAX_REQUEST_LEN {
        return Err(ioerr(format!(
            "{total} data bytes exceed the {MAX_REQUEST_LEN}-byte request cap"
        )));
    }
    if data.len() > SEG_MAX as usize {
        return Err(ioerr(format!(
            "{} data segments exceed seg_max {SEG_MAX}",
            data.len()
        )));
    }
    Ok(())
}

/// The disk's byte range for `len` bytes at `sector`, checked against the disk's capacity
/// (whole sectors only).
fn disk_range(disk: &dyn Disk, sector: u64, len: u64) -> Result<u64, Failure> {
    let capacity = disk.len() / SECTOR_SIZE * SECTOR_SIZE;
    let start = sector.checked_mul(SECTOR_SIZE);
    match start.and_then(|s| s.checked_add(len)) {
        Some(end) if end <= capacity => Ok(end - len),
        _ => Err(ioerr(format!(
            "{len} bytes at sector {sector} lie beyond the disk's {capacity} bytes"
        ))),
    }
}

/// IN (`to_guest`) or OUT. Returns the bytes read into the guest.
fn read_write(
    mem: &GuestMemory,
    data: &[Piece],
    sector: u64,
    ctx: &mut Ctx<'_>,
    to_guest: bool,
) -> Result<u32, Failure> {
    let total = check_data(mem, data, to_guest)?;
    check_size(data, total)?;
    if total % SECTOR_SIZE != 0 {
        return Err(ioerr(format!("data length {total} is not whole sectors")));
    }
    let written = u32::try_from(total).map_err(|_| ioerr("data length exceeds 4 GiB"))?;
    let mut offset = disk_range(ctx.disk, sector, total)?;
    ctx.moved = ctx.moved.saturating_add(total);
    let chunk = BOUNCE_LEN.min(usize::try_from(total).unwrap_or(BOUNCE_LEN));
    ctx.scratch.resize(chunk.max(ctx.scratch.len()), 0);
    for d in data {
        let mut done = 0u32;
        while done < d.len {
            let n = (d.len - done).min(u32::try_from(ctx.scratch.len()).unwrap_or(u32::MAX));
            let buf = &mut ctx.scratch[..n as usize];
            let addr = GuestAddress(d.addr.0 + u64::from(done));
            let res = if to_guest {
                ctx.disk
                    .read_at(buf, offset)
                    .map_err(|e| format!("read at {offset}: {e}"))
                    .and_then(|()| mem.write_slice(buf, addr).map_err(|e| e.to_string()))
            } else {
                mem.read_slice(buf, addr)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        ctx.disk
                            .write_at(buf, offset)
                            .map_err(|e| format!("write at {offset}: {e}"))
                    })
            };
            res.map_err(ioerr)?;
            done += n;
            offset += u64::from(n);
        }
    }
    Ok(if to_guest { written } else { 0 })
}

/// GET_ID: the serial, cut to the driver's buffer. Returns the bytes written.
fn get_id(mem: &GuestMemory, data: &[Piece], serial: &[u8; SERIAL_LEN]) -> Result<u32, Failure> {
    if check_data(mem, data, true)? == 0 {
        return Err(ioerr("GET_ID without a buffer"));
    }
    let mut rest: &[u8] = serial;
    for d in data {
        let n = rest.len().min(d.len as usize);
        mem.write_slice(&rest[..n], d.addr)
            .map_err(|e| ioerr(e.to_string()))?;
        rest = &rest[n..];
    }
    Ok(u32::try_from(SERIAL_LEN - rest.len()).unwrap_or(0))
}
