//! The virtio-mmio transport (virtio 1.2 section 4.2.2), generic over [`crate::VirtioDevice`].
