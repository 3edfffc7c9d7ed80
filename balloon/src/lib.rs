//! virtio-balloon and virtio-mem devices (see issues 3 and 4).
