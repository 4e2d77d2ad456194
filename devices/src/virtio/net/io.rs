//! Moving frames: TAP to rx queue, tx queue to TAP (see the module docs for the flow).

use std::io;

use tracing::debug;
use virtio_queue::QueueT;

use super::device::Net;
use super::frames::{read_chain, write_chain};
use super::{CHAIN_BUDGET, TX_QUEUE, VNET_HDR_LEN};
use crate::virtio::activation::Active;
use crate::virtio::queue_ops::{add_used, drain, notify};

/// Where `num_buffers` sits in the vnet header. The TAP skips those bytes when it writes a
/// frame, so the device sets it: one buffer per frame without MRG_RXBUF.
const NUM_BUFFERS_AT: usize = 10;

impl Net {
    /// Move frames from the TAP into rx buffers until the TAP is empty (the edge-triggered
    /// TAP fd then fires again on the next frame) or the guest has no buffer left (the frame
    /// waits, and the guest's next rx kick resumes here).
    pub(crate) fn process_rx(&mut self) {
        let Self {
            queues,
            tap,
            rx_pending,
            rx_buf,
            stats,
            ..
        } = self;
        let Some(a) = &mut queues.active else {
            // No driver: like a NIC whose link is down, drop what arrives.
            while tap.read_frame(rx_buf).is_ok_and(|n| n > 0) {}
            *rx_pending = 0;
            return;
        };
        let [queue, _] = &mut a.queues;
        if a.interrupt.queue_unusable(queue, &a.mem, "net rx") {
            return;
        }
        let mut used = false;
        let mut rechecked = false;
        loop {
            if *rx_pending == 0 {
                match tap.read_frame(rx_buf) {
                    Ok(n) if n >= VNET_HDR_LEN => *rx_pending = n,
                    // End of file: a TAP never says it, but a peer that went away must not
                    // make this loop spin.
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        crate::guest_warn!(
                            static,
                            "virtio-net: reading the TAP {}: {e}",
                            tap.name()
                        );
                        break;
                    }
                }
                rx_buf[NUM_BUFFERS_AT..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            }
            let Some(chain) = queue.pop_descriptor_chain(&a.mem) else {
                // Out of buffers: ask for a kick at the next one (with EVENT_IDX this sets
                // avail_event), then look once more, as the driver may have just added
                // some and decided not to kick.
                match queue.enable_notification(&a.mem) {
                    Ok(true) if !rechecked => {
                        rechecked = true;
                        continue;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        crate::guest_warn!(
                            static,
                            "virtio-net: cannot re-enable rx notifications: {e}"
                        );
                        break;
                    }
                }
            };
            rechecked = false;
            let head = chain.head_index();
            let len = match write_chain(&a.mem, chain, &rx_buf[..*rx_pending]) {
                Ok(len) => {
                    stats.rx_frames += 1;
                    len
                }
                Err(e) => {
                    crate::guest_warn!(static, head, "virtio-net: dropping an rx frame: {e}");
                    stats.dropped += 1;
                    0
                }
            };
            add_used(queue, &a.mem, head, len, "virtio-net");
            *rx_pending = 0;
            used = true;
        }
        if used {
            notify(queue, &a.mem, &a.interrupt, "virtio-net");
        }
    }

    /// Send every available tx chain's frame to the TAP (at most [`CHAIN_BUDGET`] per call;
    /// the device kicks itself for the rest, after the event loop's other events).
    pub(crate) fn process_tx(&mut self) {
        let Self {
            queues,
            tap,
            tx_buf,
            stats,
            ..
        } = self;
        let Some(Active {
            mem,
            queues: [_, queue],
            evts,
            interrupt,
        }) = &mut queues.active
        else {
            return;
        };
        if interrupt.queue_unusable(queue, mem, "net tx") {
            return;
        }
        let irq = (&*interrupt, "virtio-net tx");
        drain(queue, mem, &evts[TX_QUEUE], irq, CHAIN_BUDGET, |chain| {
            let head = chain.head_index();
            match read_chain(mem, chain, tx_buf) {
                Ok(n) => {
                    // No offload was negotiated: flags, GSO and checksum fields mean
                    // nothing, and the TAP must not act on them.
                    tx_buf[..NUM_BUFFERS_AT].fill(0);
                    match tap.write_frame(&tx_buf[..n]) {
                        Ok(_) => stats.tx_frames += 1,
                        Err(e) => {
                            debug!("virtio-net: TAP {} refused a frame: {e}", tap.name());
                            stats.dropped += 1;
                        }
                    }
                }
                Err(e) => {
                    crate::guest_warn!(static, head, "virtio-net: dropping a tx chain: {e}");
                    stats.dropped += 1;
                }
            }
            (0, 1)
        });
    }
}
