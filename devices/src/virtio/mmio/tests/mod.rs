use super::*;
use crate::virtio::{
    read_config_bytes, ActivateError, Activation, INTERRUPT_CONFIG, INTERRUPT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
};
use vm_memory::GuestAddress;

const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 0b101;
const MEM_SIZE: usize = 0x10_0000;

#[derive(Default)]
struct Dummy {
    acked: Option<u64>,
    activations: Vec<(Vec<virtio_queue::QueueState>, usize)>,
    resets: usize,
    config: [u8; 8],
    config_writes: Vec<(u64, Vec<u8>)>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn device_features(&self) -> u64 {
        OFFERED
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        a.interrupt.signal_used_queue().unwrap();
        self.activations.push((
            a.queues.iter().map(Queue::state).collect(),
            a.queue_evts.len(),
        ));
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.acked = None;
    }
}

struct Fixture {
    t: MmioTransport,
    dev: Arc<Mutex<Dummy>>,
}

fn fixture() -> Fixture {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let dev = Arc::new(Mutex::new(Dummy {
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        ..Dummy::default()
    }));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(mem, dev.clone(), irq).unwrap();
    Fixture { t, dev }
}

impl Fixture {
    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
    }
    fn status(&mut self, bits: u32) {
        let s = self.r(reg::STATUS);
        self.w(reg::STATUS, s | bits);
    }
    fn negotiate(&mut self, features: u64) {
        self.status(status::ACKNOWLEDGE);
        self.status(status::DRIVER);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, low(features));
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, high(features));
        self.status(status::FEATURES_OK);
    }
    /// Set up queue `i` with rings at `base` (inside guest memory).
    fn setup_queue(&mut self, i: u32, size: u32, base: u64) {
        self.w(reg::QUEUE_SEL, i);
        self.w(reg::QUEUE_NUM, size);
        self.w(reg::QUEUE_DESC_LOW, low(base));
        self.w(reg::QUEUE_DESC_HIGH, high(base));
        self.w(reg::QUEUE_DRIVER_LOW, low(base + 0x1000));
        self.w(reg::QUEUE_DRIVER_HIGH, 0);
        self.w(reg::QUEUE_DEVICE_LOW, low(base + 0x2000));
        self.w(reg::QUEUE_DEVICE_HIGH, 0);
        self.w(reg::QUEUE_READY, 1);
    }
}

#[test]
fn identification_registers() {
    let mut f = fixture();
    assert_eq!(f.r(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(f.r(reg::VERSION), 2);
    assert_eq!(f.r(reg::DEVICE_ID), 42);
    assert_eq!(f.r(reg::VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(f.r(reg::STATUS), 0);
    assert_eq!(f.r(reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(
        mmio_cmdline_fragment(0xd000_0000, 5),
        "virtio_mmio.device=512@0xd0000000:5"
    );
}

#[test]
fn device_features_by_word() {
    let mut f = fixture();
    assert_eq!(f.r(reg::DEVICE_FEATURES), low(OFFERED));
    f.w(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(f.r(reg::DEVICE_FEATURES), 1); // VERSION_1 is bit 32
    f.w(reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(f.r(reg::DEVICE_FEATURES), 0);
}

#[test]
fn feature_negotiation_accepts_a_subset() {
    let mut f = fixture();
    let want = (1 << VIRTIO_F_VERSION_1) | 0b1;
    f.negotiate(want);
    assert_eq!(
        f.r(reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    assert_eq!(f.dev.lock().unwrap().acked, Some(want));
    // Features are frozen once FEATURES_OK is set.
    f.w(reg::DRIVER_FEATURES_SEL, 0);
    f.w(reg::DRIVER_FEATURES, 0b100);
    assert_eq!(f.t.driver_features, want);
}

#[test]
fn feature_negotiation_refuses_unoffered_bits_and_legacy_drivers() {
    let mut f = fixture();
    f.negotiate((1 << VIRTIO_F_VERSION_1) | 0b10);
    assert_eq!(
        f.r(reg::STATUS) & status::FEATURES_OK,
        0,
        "bit 1 was not offered"
    );
    assert_eq!(f.dev.lock().unwrap().acked, None);

    let mut f = fixture();
    f.negotiate(0b1);
    assert_eq!(
        f.r(reg::STATUS) & status::FEATURES_OK,
        0,
        "VERSION_1 is required"
    );

    // DriverFeatures before DRIVER is ignored.
    let mut f = fixture();
    f.w(reg::DRIVER_FEATURES, 0b1);
    assert_eq!(f.t.driver_features, 0);
}

#[test]
fn status_bits_must_come_in_order() {
    let mut f = fixture();
    f.w(reg::STATUS, status::DRIVER);
    assert_eq!(f.r(reg::STATUS), 0);
    f.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
    assert_eq!(
        f.r(reg::STATUS),
        status::ACKNOWLEDGE,
        "DRIVER_OK before FEATURES_OK"
    );
    // Clearing a bit without a full reset is ignored.
    f.status(status::DRIVER);
    f.w(reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(f.r(reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
    assert!(f.dev.lock().unwrap().activations.is_empty());
}

#[test]
fn queue_setup_and_activation() {
    let mut f = fixture();
    // Queue registers are ignored before FEATURES_OK.
    f.w(reg::QUEUE_NUM, 4);
    assert_eq!(f.r(reg::QUEUE_NUM), 16);
    f.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX));

    f.w(reg::QUEUE_SEL, 0);
    assert_eq!(f.r(reg::QUEUE_NUM_MAX), 16);
    assert_eq!(f.r(reg::QUEUE_READY), 0);
    f.w(reg::QUEUE_SEL, 1);
    assert_eq!(f.r(reg::QUEUE_NUM_MAX), 8);
    f.w(reg::QUEUE_SEL, 2);
    assert_eq!(f.r(reg::QUEUE_NUM_MAX), 0, "no third queue");

    f.setup_queue(0, 8, 0x1_0000);
    f.setup_queue(1, 8, 0x2_0000);
    f.w(reg::QUEUE_SEL, 0);
    assert_eq!(f.r(reg::QUEUE_NUM), 8);
    assert_eq!(f.r(reg::QUEUE_READY), 1);
    assert_eq!(f.r(reg::QUEUE_DESC_LOW), 0x1_0000);
    assert_eq!(f.r(reg::QUEUE_DRIVER_LOW), 0x1_1000);
    assert_eq!(f.r(reg::QUEUE_DEVICE_LOW), 0x1_2000);

    f.status(status::DRIVER_OK);
    assert!(f.t.device_status() & status::DRIVER_OK != 0);
    let dev = f.dev.lock().unwrap();
    assert_eq!(dev.activations.len(), 1);
    let (states, evts) = &dev.activations[0];
    assert_eq!(*evts, 2);
    assert_eq!(states[0].size, 8);
    assert_eq!(states[0].desc_table, 0x1_0000);
    assert_eq!(states[1].used_ring, 0x2_2000);
    assert!(states.iter().all(|s| s.ready && s.event_idx_enabled));
    drop(dev);

    // Queue registers are frozen after DRIVER_OK.
    f.w(reg::QUEUE_SEL, 0);
    f.w(reg::QUEUE_NUM, 4);
    assert_eq!(f.r(reg::QUEUE_NUM), 8);
}

#[test]
fn bad_queue_settings_are_ignored_or_refuse_driver_ok() {
    let mut f = fixture();
    f.negotiate(1 << VIRTIO_F_VERSION_1);
    f.w(reg::QUEUE_SEL, 0);
    f.w(reg::QUEUE_NUM, 3); // not a power of two
    f.w(reg::QUEUE_NUM, 32); // above the maximum
    f.w(reg::QUEUE_NUM, 0x1_0000); // does not fit a u16
    assert_eq!(f.r(reg::QUEUE_NUM), 16);
    f.w(reg::QUEUE_DESC_LOW, 0x1001); // misaligned
    assert_eq!(f.r(reg::QUEUE_DESC_LOW), 0);

    f.setup_queue(0, 8, 0x1_0000);
    // Queue 1's rings lie outside guest memory.
    f.setup_queue(1, 8, MEM_SIZE as u64 + 0x1000);
    f.status(status::DRIVER_OK);
    let s = f.r(reg::STATUS);
    assert_eq!(s & status::DRIVER_OK, 0);
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(f.r(reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG, 0);
    assert!(f.dev.lock().unwrap().activations.is_empty());
    // A second try does not activate either; a reset clears the condition.
    f.status(status::DRIVER_OK);
    assert!(f.dev.lock().unwrap().activations.is_empty());
    f.w(reg::STATUS, 0);
    assert_eq!(f.r(reg::STATUS), 0);
}

#[test]
fn queue_not_ready_refuses_driver_ok() {
    let mut f = fixture();
    f.negotiate(1 << VIRTIO_F_VERSION_1);
    f.setup_queue(0, 8, 0x1_0000);
    f.status(status::DRIVER_OK);
    assert_ne!(f.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn interrupt_status_and_ack() {
    let mut f = fixture();
    f.negotiate(1 << VIRTIO_F_VERSION_1);
    f.setup_queue(0, 8, 0x1_0000);
    f.setup_queue(1, 8, 0x2_0000);
    f.status(status::DRIVER_OK);
    // The dummy raised a used-buffer interrupt when it was activated.
    assert_eq!(f.t.interrupt().irq_evt().read().unwrap(), 1);
    assert_eq!(f.r(reg::INTERRUPT_STATUS), INTERRUPT_VRING);
    f.t.interrupt().signal_config_change().unwrap();
    assert_eq!(
        f.r(reg::INTERRUPT_STATUS),
        INTERRUPT_VRING | INTERRUPT_CONFIG
    );
    f.w(reg::INTERRUPT_ACK, INTERRUPT_VRING);
    assert_eq!(f.r(reg::INTERRUPT_STATUS), INTERRUPT_CONFIG);
    f.w(reg::INTERRUPT_ACK, INTERRUPT_CONFIG);
    assert_eq!(f.r(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn config_space_and_generation() {
    let mut f = fixture();
    let mut b = [0u8; 8];
    f.t.read(reg::CONFIG, &mut b);
    assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
    let mut b = [0u8; 2];
    f.t.read(reg::CONFIG + 6, &mut b);
    assert_eq!(b, [7, 8]);
    let mut b = [0xffu8; 4];
    f.t.read(reg::CONFIG + 6, &mut b);
    assert_eq!(b, [7, 8, 0, 0], "past the end reads 0");
    f.t.write(reg::CONFIG + 1, &[9]);
    assert_eq!(f.dev.lock().unwrap().config_writes, vec![(1, vec![9])]);

    let g = f.r(reg::CONFIG_GENERATION);
    f.t.interrupt().signal_config_change().unwrap();
    assert_eq!(f.r(reg::CONFIG_GENERATION), g.wrapping_add(1));
}

#[test]
fn queue_notify_writes_the_queue_eventfd() {
    let mut f = fixture();
    f.w(reg::QUEUE_NOTIFY, 1);
    f.w(reg::QUEUE_NOTIFY, 1);
    f.w(reg::QUEUE_NOTIFY, 5); // no such queue: ignored
    assert_eq!(f.t.queue_evts()[1].read().unwrap(), 2);
    assert!(
        f.t.queue_evts()[0].read().is_err(),
        "queue 0 was not kicked"
    );
}

#[test]
fn reset_returns_to_the_initial_state() {
    let mut f = fixture();
    f.negotiate(1 << VIRTIO_F_VERSION_1);
    f.setup_queue(0, 8, 0x1_0000);
    f.setup_queue(1, 8, 0x2_0000);
    f.status(status::DRIVER_OK);
    f.w(reg::QUEUE_NOTIFY, 0);
    f.w(reg::STATUS, 0);

    assert_eq!(f.r(reg::STATUS), 0);
    assert_eq!(f.r(reg::INTERRUPT_STATUS), 0);
    assert_eq!(f.t.driver_features, 0);
    f.w(reg::QUEUE_SEL, 0);
    assert_eq!(f.r(reg::QUEUE_READY), 0);
    assert_eq!(f.r(reg::QUEUE_NUM), 16);
    let dev = f.dev.lock().unwrap();
    assert_eq!(dev.resets, 1);
    assert_eq!(dev.acked, None);
    drop(dev);

    // The device can be brought up again.
    f.negotiate(1 << VIRTIO_F_VERSION_1);
    f.setup_queue(0, 8, 0x1_0000);
    f.setup_queue(1, 8, 0x2_0000);
    f.status(status::DRIVER_OK);
    assert_eq!(f.dev.lock().unwrap().activations.len(), 2);
}

#[test]
fn odd_accesses_do_not_panic() {
    let mut f = fixture();
    let mut b = [0xffu8; 2];
    f.t.read(reg::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0], "16-bit register reads give 0");
    let mut b = [0xffu8; 4];
    f.t.read(reg::MAGIC_VALUE + 2, &mut b[..]);
    assert_eq!(b, [0; 4], "misaligned reads give 0");
    f.t.write(reg::STATUS, &[1]);
    f.t.write(reg::STATUS + 1, &[1, 0, 0, 0]);
    f.t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(f.r(reg::STATUS), 0);
    // Writes to read-only registers and unknown offsets change nothing.
    f.w(reg::MAGIC_VALUE, 0);
    f.w(reg::QUEUE_NUM_MAX, 1);
    f.w(0xf0, 1);
    assert_eq!(f.r(reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(f.r(0xf0), 0);
    // A queue selector past the end makes queue registers read 0 and ignores writes.
    f.negotiate(1 << VIRTIO_F_VERSION_1);
    f.w(reg::QUEUE_SEL, u32::MAX);
    f.w(reg::QUEUE_READY, 1);
    assert_eq!(f.r(reg::QUEUE_READY), 0);
    // The last byte of the window is config space.
    let mut b = [0xffu8; 1];
    f.t.read(MMIO_WINDOW_SIZE - 1, &mut b);
    assert_eq!(b, [0]);
}

mod state;
