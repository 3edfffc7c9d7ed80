//! REST API (see issue 5).
