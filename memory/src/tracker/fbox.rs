//! Fallible single-value boxes: the tracker never aborts on allocation failure.
//!
//! `Box::new` aborts the process when the allocator returns null. The tracker instead allocates
//! through `Vec::try_reserve_exact`, which reports failure, and turns the one-element vector into a
//! thin `Box<[T; 1]>` without reallocating. All safe Rust.

use std::ops::{Deref, DerefMut};

/// The allocator could not satisfy a request of `bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocError {
    pub bytes: usize,
}

/// A heap box created with a fallible allocation.
pub struct FBox<T>(Box<[T; 1]>);

impl<T> FBox<T> {
    /// Allocates `value` on the heap, or reports the failure instead of aborting.
    pub fn try_new(value: T) -> Result<Self, AllocError> {
        let mut v = Vec::new();
        v.try_reserve_exact(1).map_err(|_| AllocError {
            bytes: std::mem::size_of::<T>(),
        })?;
        v.push(value);
        let slice: Box<[T]> = v.into_boxed_slice();
        match Box::<[T; 1]>::try_from(slice) {
            Ok(b) => Ok(FBox(b)),
            // A one-element vector always converts into a one-element array.
            Err(_) => unreachable!("one-element slice converts to [T; 1]"),
        }
    }
}

impl<T> FBox<T> {
    /// As `try_new`, with the value made by `make` after the allocation succeeded, so that it
    /// can be written straight into the heap instead of being built and then copied.
    #[inline]
    pub fn try_new_with(make: impl FnOnce() -> T) -> Result<Self, AllocError> {
        let mut v = Vec::new();
        v.try_reserve_exact(1).map_err(|_| AllocError {
            bytes: std::mem::size_of::<T>(),
        })?;
        v.push(make());
        let slice: Box<[T]> = v.into_boxed_slice();
        match Box::<[T; 1]>::try_from(slice) {
            Ok(b) => Ok(FBox(b)),
            Err(_) => unreachable!("one-element slice converts to [T; 1]"),
        }
    }
}

impl<T> Deref for FBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0[0]
    }
}

impl<T> DerefMut for FBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0[0]
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for FBox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0[0].fmt(f)
    }
}
