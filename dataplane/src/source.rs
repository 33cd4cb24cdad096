//! Where the model comes from: the Kubernetes API ([`kube`]) or a local
//! file ([`file`]). Either hands the control thread whole models; neither
//! touches the data path.
pub mod file;
pub mod kube;
