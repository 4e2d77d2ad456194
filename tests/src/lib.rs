//! The nested test bed.
