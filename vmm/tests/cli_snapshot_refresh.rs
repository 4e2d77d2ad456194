//! After a restore, kiln sets the guest's clock and adds fresh entropy through the agent
//! (`kiln::commands::restore::refresh_guest`). Checked here against a fake agent behind a
//! hybrid-vsock Unix socket, since a tiny guest has no agent.

use std::sync::mpsc::channel;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln::commands::restore::{refresh_guest, CloneIdentity, ENTROPY_BYTES};
use kiln_agent::protocol::Frame;

mod util;
use util::{agent, scratch};

/// What the fake agent was asked, connection by connection.
#[derive(Debug)]
enum Seen {
    Time(u64),
    Entropy(Vec<u8>),
}

/// Serves `connections` connections on `uds` as the VMM + agent would, reporting the
/// requests on the returned channel.
fn fake_agent(uds: &std::path::Path, connections: usize) -> std::sync::mpsc::Receiver<Seen> {
    fake_agent_ignoring(uds, 0, connections)
}

/// Like [`fake_agent`], but the first `ignored` connections are accepted and then never
/// answered (nor closed), as when the guest drops a connection made before it handled the
/// vsock transport reset after a restore.
fn fake_agent_ignoring(
    uds: &std::path::Path,
    ignored: usize,
    connections: usize,
) -> std::sync::mpsc::Receiver<Seen> {
    let (tx, rx) = channel();
    agent::serve(uds, ignored, Some(connections), move |frame| {
        match frame {
            Frame::SetTime(t) => tx.send(Seen::Time(t.unix_nanos)),
            Frame::AddEntropy(bytes) => tx.send(Seen::Entropy(bytes)),
            other => panic!("unexpected request {other:?}"),
        }
        .ok();
        Frame::Ok
    });
    rx
}

fn now_nanos() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

#[test]
fn refresh_sets_the_time_and_sends_fresh_entropy() {
    let mut entropy = Vec::new();
    for round in 0..2 {
        let dir = scratch(&format!("ok{round}"));
        let uds = dir.join("vsock.sock");
        // wait_ready's ping, then the refresh connection.
        let seen = fake_agent(&uds, 2);
        let before = now_nanos();
        refresh_guest(&uds, Duration::from_secs(10), &CloneIdentity::default()).unwrap();
        let after = now_nanos();
        match seen.recv_timeout(Duration::from_secs(10)).unwrap() {
            Seen::Time(t) => assert!(before <= t && t <= after, "{before} <= {t} <= {after}"),
            other => panic!("expected the time first, got {other:?}"),
        }
        match seen.recv_timeout(Duration::from_secs(10)).unwrap() {
            Seen::Entropy(bytes) => {
                assert_eq!(bytes.len(), ENTROPY_BYTES);
                entropy.push(bytes);
            }
            other => panic!("expected entropy, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert_ne!(entropy[0], entropy[1], "each restore gets its own entropy");
}

#[test]
fn refresh_gives_up_when_no_agent_answers() {
    let dir = scratch("none");
    let uds = dir.join("vsock.sock");
    let err =
        refresh_guest(&uds, Duration::from_millis(200), &CloneIdentity::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("did not answer"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refresh_retries_a_connection_the_guest_dropped() {
    let dir = scratch("dropped");
    let uds = dir.join("vsock.sock");
    let seen = fake_agent_ignoring(&uds, 1, 2);
    let start = std::time::Instant::now();
    refresh_guest(&uds, Duration::from_secs(30), &CloneIdentity::default()).unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "a dropped connection held the refresh for {took:?}"
    );
    assert!(matches!(
        seen.recv_timeout(Duration::from_secs(10)).unwrap(),
        Seen::Time(_)
    ));
    assert!(matches!(
        seen.recv_timeout(Duration::from_secs(10)).unwrap(),
        Seen::Entropy(_)
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
