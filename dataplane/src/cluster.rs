//! What the data plane knows of the cluster: the [`model`] (workloads and
//! Services, updated in place one object at a time), how a Service's
//! endpoint is chosen ([`services`]), who may talk to whom ([`policy`]), and
//! where the changes come from ([`source`]: the Kubernetes API or a file).
pub mod model;
pub mod policy;
pub mod services;
pub mod source;
