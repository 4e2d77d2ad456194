//! The contract between the kiln VMM and the guest agent, and both ends of it.
//!
//! - [`binary`]: what the agent's executable must be (static) to run in any image.
//! - [`marks`]: the guest-signal port (boot done, snapshot requests).
//! - [`netif`]: IPv4 set-up of a network interface with plain ioctls (the guest's `eth0`,
//!   the host's TAP).
//! - [`protocol`]: the framed request/response protocol spoken over vsock.
//! - [`docker`]: starting `dockerd` in the guest (`/proc/1/exe docker-start`) and its report.
//! - [`client`]: the host side (plain blocking std I/O over the VM's hybrid-vsock socket).
//! - [`server`]: the agent side, written against any `Read`/`Write` stream so that it can be
//!   tested in a host process over a socket pair.
//!
//! Both ends use this crate, so the numbers and message shapes live in exactly one place.
//! Everything but `marks` and `netif` is behind the default `agent` feature: kiln-devices,
//! which needs only those two, builds without it.

/// Prints `kiln-agent: <message>` on stderr (the guest console), ignoring write errors:
/// there is nowhere else to report them.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("kiln-agent: {}\n", format_args!($($arg)*)),
        );
    }};
}

#[cfg(feature = "agent")]
pub mod binary;
#[cfg(feature = "agent")]
pub mod client;
#[cfg(feature = "agent")]
pub mod docker;
pub mod marks;
pub mod netif;
#[cfg(feature = "agent")]
mod poll;
#[cfg(feature = "agent")]
pub mod protocol;
#[cfg(feature = "agent")]
pub mod server;
