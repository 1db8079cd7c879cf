//! The kernel side as seen from userspace: the embedded program, its maps, attachment.
pub mod program;
pub mod service_index;
