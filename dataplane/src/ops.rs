//! What operators read: the admin endpoint ([`admin`]: probes and
//! `/metrics`) and the SIGUSR1 dump ([`dump`]).
pub mod admin;
pub mod dump;
