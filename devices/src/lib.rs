//! kiln's emulated devices. Nothing here calls KVM.
