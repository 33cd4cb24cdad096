//! A Pod as the agent reads it off the wire: only the fields it uses are
//! made into values; the rest of each object (containers, volumes,
//! conditions, `managedFields`, other annotations such as a
//! `last-applied-configuration`) is skipped as it is parsed, never
//! allocated. Every agent parses every pod of the cluster, at each change
//! and at each (re)list: with full `k8s-openapi` objects that was most of
//! its CPU under churn. The same URL and JSON as a `Pod`; only the type we
//! read it into differs (Cilium's agents do the same with slimmed types).
use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{de, Deserialize, Deserializer};

use crate::cluster::model::{CLIENT_ADDRESS, SKIP_INBOUND, SKIP_OUTBOUND};

/// A Pod, slimmed.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct SlimPod {
    /// Name, namespace, labels, our annotations, resource version.
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<Spec>,
    #[serde(default)]
    pub status: Option<Status>,
}

/// What is read of `spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Spec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
}

/// What is read of `status`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Status {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

/// One of `status.podIPs`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct PodIp {
    pub ip: String,
}

impl kube::Resource for SlimPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The annotations the agent reads; every other is skipped.
const OURS: [&str; 3] = [SKIP_OUTBOUND, SKIP_INBOUND, CLIENT_ADDRESS];

/// `metadata`, slimmed: what the watcher (name, namespace, resource version,
/// uid) and the views (labels, our annotations) read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "our_annotations")]
    annotations: Option<BTreeMap<String, String>>,
}

fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        annotations: m.annotations,
        ..ObjectMeta::default()
    })
}

/// The annotations among [`OURS`], the others' values skipped unread.
fn our_annotations<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Ours;
    impl<'de> de::Visitor<'de> for Ours {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of annotations")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if OURS.contains(&key.as_ref()) {
                    kept.insert(key.into_owned(), map.next_value::<String>()?);
                } else {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }
    d.deserialize_option(Ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    #[test]
    fn a_full_pod_reads_as_its_few_fields() {
        let pod: SlimPod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "labels": {"app": "web", "dataplane.dev/mesh": "enabled"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a very\": [\"long\", \"value\"]}",
                    SKIP_INBOUND: "9090",
                    "nested": {"not": "a string"}
                },
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
                "ownerReferences": [{"kind": "ReplicaSet", "name": "web-abc", "uid": "r", "apiVersion": "apps/v1"}]
            },
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "hostNetwork": false,
                     "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.2", "podIPs": [{"ip": "10.0.0.2"}, {"ip": "fd00::2"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("a pod");
        assert_eq!((pod.name_any(), pod.namespace()), ("web-1".into(), Some("shop".into())));
        assert_eq!(pod.resource_version().as_deref(), Some("42"));
        assert_eq!(pod.labels().len(), 2, "every label");
        assert_eq!(pod.annotations().len(), 1, "our annotations only: {:?}", pod.annotations());
        assert_eq!(pod.annotations().get(SKIP_INBOUND).map(String::as_str), Some("9090"));
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!((spec.node_name.as_deref(), spec.service_account_name.as_deref()), (Some("node-a"), Some("web")));
        let status = pod.status.as_ref().expect("status");
        let ips: Vec<&str> = status.pod_ips.iter().flatten().map(|p| p.ip.as_str()).collect();
        assert_eq!(ips, ["10.0.0.2", "fd00::2"]);
        // A pod with none of the optional parts is a pod too.
        let bare: SlimPod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "annotations": null}})).expect("bare");
        assert!(bare.spec.is_none() && bare.annotations().is_empty());
    }
}
