//! Placeholder: the load tests through the real data path are issue 6.
