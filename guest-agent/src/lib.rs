//! The contract between the kiln VMM and the guest agent.
//!
//! Both ends use this crate, so the numbers below live in exactly one place.

pub mod marks;
