//! kiln's end-to-end tests, a module per topic. One binary, so that libtest runs the
//! tests of every topic side by side (each in its own test bed, or on this machine's
//! `/dev/kvm`) and one failing topic does not stop the others:
//! `cargo test -p kiln-tests --test e2e snapshot::` runs one topic.
//!
//! The nesting contract test (`tests/tests/nesting.rs`) is a binary of its own, so that
//! its test bed runs alone: it boots two Debian VMs at once, each making its slot's warm
//! snapshot, and beside another test bed on a 2-core host both Creates ran past their
//! 400 s boot timeout.

mod agent;
mod boot;
mod boot_acpi;
mod boot_initrd;
mod gitlab;
mod gitlab_images;
mod gitlab_pull;
mod hostile;
mod image_disk;
mod image_noshell;
mod image_oci;
mod image_store;
mod install;
mod jail;
mod job;
mod nesting_docs;
mod net;
mod net_policy;
mod shell;
mod slot;
mod snapshot;
mod snapshot_diff;
mod snapshot_io;
mod snapshot_job;
mod snapshot_timers;
mod soak;
mod testbed;
mod workload;
