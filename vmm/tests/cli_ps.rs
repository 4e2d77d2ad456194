//! `kiln ps` on the direct path: two spinning VMs with control APIs are listed with their
//! sockets while they run, and none once they are stopped.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod util;

use util::{next_line, scratch, spin_kernel_saying};

fn kiln(run_dir: &Path) -> Command {
    let mut cmd = util::kiln();
    cmd.env("KILN_RUN_DIR", run_dir);
    cmd
}

/// A spinning VM with an API socket, once its guest has printed: kiln registers a VM
/// before its guest runs, so it is listed by then.
fn spinning_vm(run_dir: &Path, kernel: &Path, api: &Path) -> Child {
    let mut child = kiln(run_dir)
        .args(["run", "--memory", "32", "--vcpus", "2", "--kernel"])
        .arg(kernel)
        .arg("--api")
        .arg(api)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = next_line(&mut BufReader::new(child.stdout.as_mut().unwrap()));
    assert_eq!(line, "spinning\n");
    child
}

fn ps_json(run_dir: &Path) -> Vec<serde_json::Value> {
    let out = kiln(run_dir).args(["ps", "--json"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

#[test]
fn ps_lists_running_vms_with_their_sockets_and_none_after_they_stop() {
    let dir = scratch("ps");
    let run_dir = dir.join("run");
    let kernel = spin_kernel_saying(&dir, "spinning\n");
    let apis: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("api{i}.sock"))).collect();
    let mut vms: Vec<Child> = apis
        .iter()
        .map(|api| spinning_vm(&run_dir, &kernel, api))
        .collect();

    // kiln writes the record before the guest runs, and each guest has printed.
    let listed = ps_json(&run_dir);
    let mut pids: Vec<u64> = listed.iter().map(|v| v["pid"].as_u64().unwrap()).collect();
    pids.sort();
    let mut expected: Vec<u64> = vms.iter().map(|c| u64::from(c.id())).collect();
    expected.sort();
    assert_eq!(pids, expected, "{listed:?}");
    for vm in &listed {
        let api = PathBuf::from(vm["api"].as_str().unwrap());
        assert!(apis.contains(&api), "{vm}");
        assert_eq!(
            (vm["vcpus"].as_u64(), vm["memory_mib"].as_u64()),
            (Some(2), Some(32))
        );
        assert!(vm["uptime_s"].as_u64().is_some(), "{vm}");
    }
    let table = kiln(&run_dir).arg("ps").output().unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert_eq!(table.lines().count(), 3, "{table}");

    // Stopped through their APIs, they are gone from the list.
    for api in &apis {
        let out = kiln(&run_dir)
            .args(["ctl", "--api"])
            .arg(api)
            .arg("shutdown")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    for vm in &mut vms {
        assert!(vm.wait().unwrap().success());
    }
    assert_eq!(ps_json(&run_dir), Vec::<serde_json::Value>::new());
    // A killed kiln leaves its record behind; ps drops it.
    let mut killed = spinning_vm(&run_dir, &kernel, &dir.join("api-k.sock"));
    assert_eq!(ps_json(&run_dir).len(), 1);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(ps_json(&run_dir), Vec::<serde_json::Value>::new());
    assert_eq!(std::fs::read_dir(&run_dir).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
