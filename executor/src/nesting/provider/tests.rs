//! The provider's rules against a fake backend.

use std::time::Duration;

use tonic::Code;

use super::*;
use crate::nesting::fake::Fake;

fn settings() -> Settings {
    Settings {
        slots: 4,
        memory_mib: 512,
        vcpus: 1,
        ssh_user: "ci".into(),
        ssh_password: Some("pw".into()),
    }
}

fn provider(fake: Fake, dir: &std::path::Path) -> Provider<Fake> {
    Provider::new(Arc::new(fake), Records::open(dir).unwrap(), settings())
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test]
async fn calls_before_init_fail_with_the_exact_message_and_init_once() {
    let dir = tmp();
    let p = provider(Fake::new(), dir.path());
    for err in [
        p.create("debian-ci", Some(0)).await.unwrap_err(),
        p.delete("x").await.unwrap_err(),
        p.list().await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(err.message(), "not initialized");
    }
    // The runner's Init without a nesting_config table sends the JSON `null`.
    p.init(b"null").unwrap();
    let err = p.init(b"null").unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::FailedPrecondition, "already initialized")
    );
    assert!(p.list().await.unwrap().is_empty());
}

#[test]
fn init_config_is_json_of_nesting_config() {
    assert_eq!(InitConfig::parse(b"").unwrap(), InitConfig::default());
    assert_eq!(InitConfig::parse(b"null").unwrap(), InitConfig::default());
    let c = InitConfig::parse(br#"{"ssh_user":"u","ssh_password":"p","memory_mib":1024}"#).unwrap();
    assert_eq!(c.ssh_user.as_deref(), Some("u"));
    assert_eq!(c.memory_mib, Some(1024));
    let err = InitConfig::parse(br#"{"memory":1}"#).unwrap_err();
    assert!(err.contains("known keys"), "{err}");
    // A bad config leaves the server uninitialised, with a clear error.
    let dir = tmp();
    let p = provider(Fake::new(), dir.path());
    let err = p.init(b"{nope").unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    p.init(br#"{"vcpus":2}"#).unwrap();
}

#[tokio::test]
async fn create_stomps_the_slots_previous_vm() {
    let dir = tmp();
    let p = provider(Fake::new(), dir.path());
    p.init(b"null").unwrap();
    let (a, stomped) = p.create("debian-ci", Some(1)).await.unwrap();
    assert_eq!(stomped, None);
    assert_eq!(a.addr, "10.77.1.2:22");
    let (b, stomped) = p.create("alpine", Some(1)).await.unwrap();
    assert_eq!(stomped.as_deref(), Some(a.id.as_str()));
    assert_eq!(p.backend.running(), vec![b.id.clone()]);
    let (c, stomped) = p.create("alpine", Some(2)).await.unwrap();
    assert_eq!(stomped, None);
    let ids: Vec<String> = p.list().await.unwrap().into_iter().map(|v| v.id).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&b.id) && ids.contains(&c.id));
}

#[tokio::test]
async fn a_failed_stomp_keeps_the_mapping_and_fails_the_create() {
    let dir = tmp();
    let p = provider(Fake::new(), dir.path());
    p.init(b"null").unwrap();
    let (a, _) = p.create("debian-ci", Some(0)).await.unwrap();
    p.backend.fail_destroy.lock().unwrap().insert(a.id.clone());
    let err = p.create("debian-ci", Some(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains(&a.id), "{}", err.message());
    assert_eq!(
        p.backend.running(),
        vec![a.id.clone()],
        "no second VM booted"
    );
    // The slot still holds the old VM: once it can be deleted, the next Create stomps it.
    p.backend.fail_destroy.lock().unwrap().clear();
    let (b, stomped) = p.create("debian-ci", Some(0)).await.unwrap();
    assert_eq!(stomped, Some(a.id));
    assert_eq!(p.backend.running(), vec![b.id]);
}

#[tokio::test]
async fn delete_clears_the_slot_and_unknown_ids_are_not_found() {
    let dir = tmp();
    let p = provider(Fake::new(), dir.path());
    p.init(b"null").unwrap();
    let (a, _) = p.create("debian-ci", Some(3)).await.unwrap();
    p.delete(&a.id).await.unwrap();
    assert!(p.backend.running().is_empty());
    assert!(p.list().await.unwrap().is_empty());
    // The slot is free: a new Create there stomps nothing.
    let (_, stomped) = p.create("debian-ci", Some(3)).await.unwrap();
    assert_eq!(stomped, None);
    let err = p.delete(&a.id).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&a.id));
    // A failed delete keeps the VM listed.
    let (b, _) = p.create("alpine", Some(0)).await.unwrap();
    p.backend.fail_destroy.lock().unwrap().insert(b.id.clone());
    assert_eq!(p.delete(&b.id).await.unwrap_err().code(), Code::Internal);
    assert!(p.list().await.unwrap().iter().any(|v| v.id == b.id));
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let dir = tmp();
    let p = provider(Fake::new(), dir.path());
    p.init(b"null").unwrap();
    let err = p.create("ubuntu", Some(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "no image \"ubuntu\"; the images there are: debian-ci, alpine"
    );
    for slot in [-1, i32::MIN, 4, i32::MAX] {
        let err = p.create("alpine", Some(slot)).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (
                Code::InvalidArgument,
                format!(
                    "slot {slot} is out of range: this server has slots 0 to 3 (its `slots` \
                     setting; the runner's capacity_per_instance must not be larger)"
                )
                .as_str()
            )
        );
    }
    let err = p.create("../etc", Some(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("../etc"), "{}", err.message());
    let err = p.delete("kiln-s0-none").await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "no VM with id \"kiln-s0-none\"")
    );
    // Bad nesting_config: unknown keys and zero sizes.
    let dir2 = tmp();
    let q = provider(Fake::new(), dir2.path());
    for bad in [&br#"{"memory":1}"#[..], br#"{"vcpus":0}"#, b"[1"] {
        let err = q.init(bad).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().starts_with("nesting_config"),
            "{}",
            err.message()
        );
    }
    assert!(p.backend.running().is_empty());
}

#[tokio::test]
async fn not_enough_memory_is_resource_exhausted() {
    let dir = tmp();
    let fake = Fake {
        memory_mib: 1000,
        ..Fake::new()
    };
    let p = provider(fake, dir.path());
    p.init(br#"{"memory_mib":1024}"#).unwrap();
    let err = p.create("alpine", Some(0)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::ResourceExhausted,
            "not enough memory for a VM of 1024 MiB (+64 MiB for its VMM): 1000 MiB available"
        )
    );
    assert!(p.backend.running().is_empty());
}

#[tokio::test]
async fn a_boot_timeout_is_deadline_exceeded() {
    let dir = tmp();
    let fake = Fake::new();
    *fake.create_error.lock().unwrap() = Some(BackendError::Timeout);
    let p = provider(fake, dir.path());
    p.init(b"null").unwrap();
    let err = p.create("alpine", Some(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        err.message().ends_with("did not come up"),
        "{}",
        err.message()
    );
    assert!(p.list().await.unwrap().is_empty());
    // Nothing stays reserved: the memory check still passes.
    *p.backend.create_error.lock().unwrap() = None;
    p.create("alpine", Some(0)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_in_different_slots_run_in_parallel() {
    let dir = tmp();
    // Each create waits until the other has started: serialised Creates never finish.
    let fake = Fake {
        barrier: Some(tokio::sync::Barrier::new(2)),
        ..Fake::new()
    };
    let p = Arc::new(provider(fake, dir.path()));
    p.init(b"null").unwrap();
    let (p1, p2) = (p.clone(), p.clone());
    let both = async move {
        tokio::join!(
            tokio::spawn(async move { p1.create("alpine", Some(0)).await }),
            tokio::spawn(async move { p2.create("alpine", Some(1)).await }),
        )
    };
    let (a, b) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("the two Creates waited for each other");
    a.unwrap().unwrap();
    b.unwrap().unwrap();
    assert_eq!(p.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_restarted_server_lists_what_still_runs_and_never_a_dead_vm() {
    let dir = tmp();
    let p = provider(Fake::new(), dir.path());
    p.init(b"null").unwrap();
    let (a, _) = p.create("alpine", Some(0)).await.unwrap();
    let (b, _) = p.create("debian-ci", Some(1)).await.unwrap();
    let (c, _) = p.create("debian-ci", Some(2)).await.unwrap();
    // The server goes away; VM b dies meanwhile; a and c keep running, and so does the VM
    // of a Create the server was killed in (started, never recorded).
    let unfinished = "kiln-s3-unfinished".to_string();
    let fake = Fake::new();
    fake.running
        .lock()
        .unwrap()
        .extend([a.id.clone(), c.id.clone(), unfinished.clone()]);
    drop(p);
    let p = provider(fake, dir.path());
    assert_eq!(p.recover().await.unwrap(), 2);
    // The dead VM's leftovers are cleaned up and its record is gone; the unrecorded VM is
    // destroyed.
    assert_eq!(
        *p.backend.destroyed.lock().unwrap(),
        vec![b.id.clone(), unfinished.clone()]
    );
    assert_eq!(p.backend.running(), vec![a.id.clone(), c.id.clone()]);
    assert!(!dir
        .path()
        .join("vms")
        .join(format!("{}.json", b.id))
        .exists());
    // The runner's first call after the restart inits lazily, then Lists.
    assert_eq!(p.list().await.unwrap_err().message(), "not initialized");
    p.init(b"null").unwrap();
    assert_eq!(p.list().await.unwrap(), vec![a.clone(), c.clone()]);
    // The recovered slots are held: a Create in slot 0 stomps a.
    let (_, stomped) = p.create("alpine", Some(0)).await.unwrap();
    assert_eq!(stomped, Some(a.id.clone()));
    // A VM that dies while the server runs is dropped from List.
    p.backend.running.lock().unwrap().remove(&c.id);
    let ids: Vec<String> = p.list().await.unwrap().into_iter().map(|v| v.id).collect();
    assert!(!ids.contains(&c.id), "{ids:?}");
    let (_, stomped) = p.create("alpine", Some(2)).await.unwrap();
    assert_eq!(stomped, None, "the dead VM's slot was freed");
}

#[tokio::test]
async fn shutdown_stops_every_vm() {
    let dir = tmp();
    let p = provider(Fake::new(), dir.path());
    p.init(b"null").unwrap();
    for slot in 0..3 {
        p.create("alpine", Some(slot)).await.unwrap();
    }
    p.shutdown().await.unwrap();
    assert!(p.backend.running().is_empty());
    assert!(p.list().await.unwrap().is_empty());
    assert!(Records::open(dir.path())
        .unwrap()
        .load()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_missing_password_is_a_clear_error() {
    let dir = tmp();
    let p = Provider::new(
        Arc::new(Fake::new()),
        Records::open(dir.path()).unwrap(),
        Settings {
            ssh_password: None,
            ..settings()
        },
    );
    p.init(b"null").unwrap();
    let err = p.create("alpine", Some(0)).await.unwrap_err();
    assert!(err.message().contains("ssh_password"), "{}", err.message());
    assert!(p.backend.running().is_empty());
    let dir2 = tmp();
    let p = provider(Fake::new(), dir2.path());
    p.init(br#"{"ssh_password":"x","ssh_user":"job"}"#).unwrap();
    p.create("alpine", Some(0)).await.unwrap();
}
