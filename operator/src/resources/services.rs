//! The Services: the headless peer Service (stable member DNS names) and
//! the client Service.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Names, meta, selector};
use crate::crd::DistributedCacheCluster;

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        ..ServicePort::default()
    }
}

/// The headless Service that gives every node its stable DNS name; it
/// publishes not-ready pods too, so members find each other while starting.
pub fn peer_service(dcc: &DistributedCacheCluster) -> Service {
    let n = Names::of(dcc);
    Service {
        metadata: meta(dcc, &n.peers),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(dcc)),
            ports: Some(vec![
                port("grpc", dcc.spec.ports.grpc),
                port("peer", dcc.spec.ports.peer),
                port("metrics", dcc.spec.ports.metrics),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The client Service (ready pods only).
pub fn client_service(dcc: &DistributedCacheCluster) -> Service {
    let n = Names::of(dcc);
    Service {
        metadata: meta(dcc, &n.cluster),
        spec: Some(ServiceSpec {
            selector: Some(selector(dcc)),
            ports: Some(vec![port("grpc", dcc.spec.ports.grpc)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}
