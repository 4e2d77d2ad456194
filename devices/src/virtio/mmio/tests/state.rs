//! Transport construction errors and snapshot state.

use super::*;
use crate::persist::Persist;
use crate::virtio::Activation;

#[test]
fn legacy_only_device_is_rejected() {
    struct Legacy;
    impl VirtioDevice for Legacy {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[3]
        }
        fn device_features(&self) -> u64 {
            0
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: Activation) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let err = MmioTransport::new(mem, Arc::new(Mutex::new(Legacy)), irq)
        .err()
        .unwrap();
    assert!(matches!(err, MmioError::NotModern(1)), "{err}");
}

#[test]
fn state_round_trip() {
    let mut f = fixture();
    f.negotiate((1 << VIRTIO_F_VERSION_1) | 1);
    f.setup_queue(0, 8, 0x1_0000);
    f.setup_queue(1, 4, 0x2_0000);
    f.status(status::DRIVER_OK);
    f.t.interrupt().signal_config_change().unwrap();
    f.w(reg::QUEUE_SEL, 1);
    let state = f.t.save();
    assert_eq!(state.version, MMIO_STATE_VERSION);
    assert_eq!(state.queues[1].size, 4);
    let json = serde_json::to_string(&state).unwrap();
    let state: MmioTransportState = serde_json::from_str(&json).unwrap();

    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let evts = || (0..2).map(|_| EventFd::new(0).unwrap()).collect::<Vec<_>>();
    let device: Arc<Mutex<dyn VirtioDevice>> = f.dev.clone();
    let restore = |state: &MmioTransportState| {
        let args = MmioRestoreArgs {
            mem: mem.clone(),
            device: device.clone(),
            interrupt: irq.clone(),
            queue_evts: evts(),
        };
        MmioTransport::restore(args, state)
    };
    let mut g = Fixture {
        t: restore(&state).unwrap(),
        dev: f.dev.clone(),
    };
    for off in [
        reg::STATUS,
        reg::QUEUE_SEL,
        reg::QUEUE_NUM,
        reg::QUEUE_READY,
        reg::QUEUE_DESC_LOW,
        reg::QUEUE_DEVICE_LOW,
        reg::INTERRUPT_STATUS,
        reg::CONFIG_GENERATION,
    ] {
        assert_eq!(g.r(off), f.r(off), "register {off:#x}");
    }
    assert_eq!(g.t.save(), state);
    assert_eq!(
        f.dev.lock().unwrap().activations.len(),
        1,
        "not re-activated"
    );
    // The restored transport keeps working: a reset goes to the device.
    g.w(reg::STATUS, 0);
    assert_eq!(f.dev.lock().unwrap().resets, 1);

    let mut bad = state.clone();
    bad.version = 7;
    let r = restore(&bad);
    assert!(matches!(r, Err(MmioError::StateVersion { found: 7, .. })));
    let mut bad = state.clone();
    bad.driver_features |= 0b10;
    let r = restore(&bad);
    assert!(matches!(r, Err(MmioError::BadState(_))));
    let mut bad = state.clone();
    bad.queues.pop();
    let r = restore(&bad);
    assert!(matches!(r, Err(MmioError::BadState(_))));
    let mut bad = state;
    bad.queues[0].desc_table = 0x1001;
    let r = restore(&bad);
    assert!(matches!(r, Err(MmioError::BadQueue(_))));
}
