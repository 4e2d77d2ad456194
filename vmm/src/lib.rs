//! kiln VMM
