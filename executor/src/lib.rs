//! The `kiln-gitlab` library: the driver's command line ([`cli`]). The driver itself is the
//! `kiln-gitlab` binary (`src/main.rs` and its modules).

pub mod cli;
