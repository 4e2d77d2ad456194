//! Writes the seed corpora of `agent_frame` and `snapshot_state` into `fuzz/corpus/`:
//! a few valid inputs each, encoded by kiln's own code (so they stay valid as formats
//! change). Run from the repo root:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus
//!
//! The seeds of `virtq_chain` and `vsock_packets` (structured inputs built with
//! `arbitrary`) were picked from a short fuzzing run instead; see fuzz/README.md.

use std::path::{Path, PathBuf};

use kiln::device_manager::{DevicesState, MmioWindow, VirtioDeviceState, VirtioState};
use kiln::snapshot::{write_state, MachineInfo, SnapshotState};
use kiln::vstate::vcpu_state::VcpuState;
use kiln_agent::protocol::{
    encode, ErrorMessage, ExecRequest, FileInfo, Frame, GetFile, Pong, PutFile, SetTime, Started,
    WindowSize,
};
use kiln_devices::virtio::rng::{RngState, RNG_STATE_VERSION};
use kiln_devices::virtio::vsock::{VsockState, VSOCK_STATE_VERSION};
use kiln_devices::virtio::{MmioTransportState, QueueSnapshot};
use kiln_devices::{I8042State, SerialState};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn frames(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(|f| encode(f).unwrap()).collect()
}

fn agent_frame() {
    let dir = corpus("agent_frame");
    let seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        (
            "exec",
            0,
            frames(&[Frame::Exec(
                ExecRequest::new(["sh", "-c", "echo hi"])
                    .env("CI", "1")
                    .cwd("/tmp")
                    .stdin_pipe(),
            )]),
        ),
        (
            "exec-session",
            3,
            frames(&[
                Frame::Ping,
                Frame::Pong(Pong {
                    version: 1,
                    agent: "0.1.0".into(),
                    uptime_ms: 12,
                }),
                Frame::Stdin(b"input\n".to_vec()),
                Frame::StdinEof,
                Frame::Stdout(b"hi\n".to_vec()),
                Frame::Stderr(b"oops\n".to_vec()),
                Frame::Ok,
            ]),
        ),
        (
            "exec-tty",
            0,
            frames(&[
                Frame::Exec(
                    ExecRequest::new(["/bin/sh", "-l"])
                        .stdin_pipe()
                        .tty(WindowSize { rows: 24, cols: 80 }),
                ),
                Frame::Started(Started {
                    exec_id: 1,
                    pid: 42,
                    tty: true,
                }),
                Frame::Stdin(b"stty size\r".to_vec()),
                Frame::Resize(WindowSize {
                    rows: 33,
                    cols: 101,
                }),
                Frame::Stdout(b"33 101\r\n".to_vec()),
            ]),
        ),
        (
            "files",
            0,
            frames(&[
                Frame::PutFile(PutFile {
                    path: "/tmp/x".into(),
                    mode: 0o755,
                }),
                Frame::Data(vec![7; 100]),
                Frame::DataEnd,
                Frame::GetFile(GetFile {
                    path: "/etc/hostname".into(),
                }),
                Frame::FileInfo(FileInfo {
                    size: 100,
                    mode: 0o644,
                }),
            ]),
        ),
        (
            "misc",
            16,
            frames(&[
                Frame::SetTime(SetTime {
                    unix_nanos: 1_700_000_000_000_000_000,
                }),
                Frame::AddEntropy(vec![1; 32]),
                Frame::Error(ErrorMessage {
                    message: "no such file".into(),
                }),
                Frame::Shutdown,
            ]),
        ),
    ];
    for (name, mode, bytes) in seeds {
        let mut input = vec![mode];
        input.extend_from_slice(&bytes);
        std::fs::write(dir.join(name), input).unwrap();
    }
}

fn queue() -> QueueSnapshot {
    QueueSnapshot {
        max_size: 256,
        next_avail: 3,
        next_used: 3,
        event_idx_enabled: true,
        size: 256,
        ready: true,
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x3000,
    }
}

fn vcpu(index: u8) -> VcpuState {
    VcpuState {
        index,
        cpuid: vec![Default::default(); 2],
        msrs: vec![Default::default(); 2],
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: None,
        mp_state: Default::default(),
        vcpu_events: Default::default(),
    }
}

fn snapshot_state() {
    let dir = corpus("snapshot_state");
    let small = SnapshotState {
        machine: MachineInfo {
            vcpus: 1,
            memory_mib: 16,
            irqchip: false,
            vsock_cid: Some(3),
        },
        vcpus: vec![vcpu(0)],
        vm: None,
        devices: DevicesState {
            serial: SerialState::default(),
            i8042: I8042State::default(),
            virtio: vec![
                VirtioDeviceState {
                    window: MmioWindow::nth(0).unwrap(),
                    transport: MmioTransportState {
                        version: 1,
                        device_status: 0xf,
                        device_features_sel: 0,
                        driver_features: 1 << 32,
                        driver_features_sel: 1,
                        queue_sel: 2,
                        queues: vec![queue(); 3],
                        interrupt_status: 0,
                        config_generation: 0,
                    },
                    device: VirtioState::Vsock(VsockState {
                        version: VSOCK_STATE_VERSION,
                        guest_cid: 3,
                        acked_features: 1 << 32,
                        queues: vec![queue(); 3],
                        next_host_port: 1 << 30,
                    }),
                },
                VirtioDeviceState {
                    window: MmioWindow::nth(1).unwrap(),
                    transport: MmioTransportState {
                        version: 1,
                        device_status: 0xf,
                        device_features_sel: 0,
                        driver_features: 1 << 32,
                        driver_features_sel: 1,
                        queue_sel: 0,
                        queues: vec![queue(); 1],
                        interrupt_status: 0,
                        config_generation: 0,
                    },
                    device: VirtioState::Rng(RngState {
                        version: RNG_STATE_VERSION,
                        acked_features: 1 << 32,
                        queues: vec![queue(); 1],
                    }),
                },
            ],
        },
        diff: None,
    };
    let with_vcpu = SnapshotState {
        machine: MachineInfo {
            vcpus: 1,
            memory_mib: 16,
            irqchip: false,
            vsock_cid: None,
        },
        vcpus: vec![vcpu(0)],
        vm: None,
        devices: DevicesState::default(),
        diff: None,
    };
    let tmp = std::env::temp_dir().join(format!("kiln-gen-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (name, state) in [("small", small), ("vcpu", with_vcpu)] {
        write_state(&tmp, &state).unwrap();
        let file = std::fs::read(tmp.join(kiln::snapshot::STATE_FILE)).unwrap();
        // Mode 0 (even): the whole file; mode 1 (odd): the payload alone, re-wrapped.
        let mut whole = vec![0u8];
        whole.extend_from_slice(&file);
        std::fs::write(dir.join(format!("{name}-file")), whole).unwrap();
        let mut payload = vec![1u8];
        payload.extend_from_slice(&file[52..]);
        std::fs::write(dir.join(format!("{name}-payload")), payload).unwrap();
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn main() {
    agent_frame();
    snapshot_state();
    println!("seeds written under {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
