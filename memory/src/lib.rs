//! Host-side guest-memory manager (see issue 2).
