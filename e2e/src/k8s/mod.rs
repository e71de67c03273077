//! **Test doubles** of a Kubernetes control plane, for the operator's
//! end-to-end test on machines where no real API server can run: a fake API
//! server ([`apiserver`]) and a StatefulSet controller + kubelet
//! ([`kubelet`]) that runs real `distcache-node` processes on 127.0.0.x.
//! They exist for tests only; they are not part of the product.

pub mod apiserver;
pub mod kubelet;
