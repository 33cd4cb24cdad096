//! The control thread and what it drives on the node: [`run`] (start-up and
//! the loop), [`enroll`] (pod namespaces matched to workloads), [`cni`] (the
//! CNI plugin's socket and its installation), [`return_path`] (the client's
//! address and strict tables inside pods) and [`uninstall`] (taking it all
//! off the node).
pub mod cni;
pub mod enroll;
pub mod return_path;
pub mod run;
pub mod uninstall;
