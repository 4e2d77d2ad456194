//! One module per `kiln` subcommand; `main.rs` only dispatches.

pub mod cp;
pub mod exec;
pub mod job;
pub mod run;
