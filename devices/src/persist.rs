//! [`Persist`]: the one way a device's snapshot state is saved and brought back.
//!
//! Save and restore are two halves of one contract: whatever [`Persist::save`] writes,
//! [`Persist::restore`] must accept, so they live on one trait instead of as unrelated
//! methods that drift apart in name and shape. The state is a plain serializable struct
//! next to the device (`SerialState`, `VsockState`, …); the trait does not serialize it,
//! the snapshot code does, so a device's state format stays the struct's serde form.
//!
//! What a device needs besides its state to come back differs: host resources a snapshot
//! cannot carry (a TAP, a socket path, eventfds the VMM registers with KVM) and guest memory.
//! Each device names them in a small `…RestoreArgs` struct next to its state, so a restore
//! call spells out what it hands over instead of relying on argument order.

/// A device whose state a snapshot carries.
pub trait Persist: Sized {
    /// The serializable state, with a format version where the device has one.
    type State;
    /// The host-side parts the restored device is built around.
    type ConstructorArgs;
    /// Why a state could not be restored (a foreign format version, a corrupt state, a host
    /// resource that failed to open). `std::convert::Infallible` if restoring cannot fail.
    type Error;

    /// The device's state for a snapshot, taken while the vCPUs are paused so the guest
    /// cannot change it halfway.
    fn save(&self) -> Self::State;

    /// A device rebuilt from `state` around `args`, as the guest left it at [`Self::save`].
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// `From` both ways, by reference, between a device's serializable state struct and
/// another crate's struct with the same fields (which has no serde): each listed field is
/// copied as is. Each side is built with a struct literal, so a field added to either one
/// stops the build until it is listed here.
macro_rules! field_for_field {
    ($ours:ty, $theirs:ty, [$($field:ident),* $(,)?]) => {
        impl From<&$theirs> for $ours {
            fn from(s: &$theirs) -> Self {
                Self { $($field: Clone::clone(&s.$field)),* }
            }
        }

        impl From<&$ours> for $theirs {
            fn from(s: &$ours) -> Self {
                Self { $($field: Clone::clone(&s.$field)),* }
            }
        }
    };
}
pub(crate) use field_for_field;
