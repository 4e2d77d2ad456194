//! One module per `kiln` subcommand; `main.rs` only dispatches.

mod common;
pub mod cp;
pub mod ctl;
pub mod doctor;
pub mod exec;
pub mod fork;
pub mod image;
pub mod jail;
pub mod job;
pub mod net;
pub mod ps;
pub mod restore;
pub mod run;
pub mod shell;
