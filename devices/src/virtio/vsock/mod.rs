//! virtio-vsock (placeholder).
