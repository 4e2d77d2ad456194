//! One module per `kiln` subcommand; `main.rs` only dispatches.

pub mod cp;
pub mod exec;
pub mod run;
