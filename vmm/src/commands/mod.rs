//! One module per `kiln` subcommand; `main.rs` only dispatches.

pub mod cp;
pub mod ctl;
pub mod exec;
pub mod fork;
pub mod jail;
pub mod job;
pub mod restore;
pub mod run;
