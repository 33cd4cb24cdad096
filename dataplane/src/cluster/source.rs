//! Where the model comes from: the Kubernetes API ([`kube`]) or a local
//! file ([`mod@file`]). Either hands the control thread whole models; neither
//! touches the data path. With the API, [`nodeca`] also obtains this node's
//! CA through a CertificateSigningRequest.
pub mod file;
pub mod kube;
pub mod nodeca;
