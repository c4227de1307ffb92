//! The three kinds DNS watches, decoded to only the fields it reads.
//! The API's objects carry far more (managed fields, annotations, whole
//! pod specs and statuses); decoded whole, every listed or watched object
//! cost the process several times what its records do. serde skips the
//! other fields without allocating for them.
//!
//! Field names and optionality follow the API (core/v1 Service and Pod,
//! discovery.k8s.io/v1 EndpointSlice); every list is optional, since the
//! API may send `null` for an empty one.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::records::SERVICE_NAME_LABEL;

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub external_name: Option<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<Port>>,
    pub publish_not_ready_addresses: Option<bool>,
}

/// A Service's or an EndpointSlice's port (the fields both share).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Port {
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointSlice {
    /// Of the labels only the owning Service's name is kept.
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    pub endpoints: Option<Vec<Endpoint>>,
    pub ports: Option<Vec<Port>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoint {
    pub addresses: Option<Vec<String>>,
    pub hostname: Option<String>,
    pub conditions: Option<EndpointConditions>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodSpec {
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
    pub conditions: Option<Vec<PodCondition>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub status: Option<String>,
}

macro_rules! resource {
    ($ty:ty, $kind:literal, $group:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }

            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }

            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed("v1")
            }

            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource!(Service, "Service", "", "services");
resource!(
    EndpointSlice,
    "EndpointSlice",
    "discovery.k8s.io",
    "endpointslices"
);
resource!(Pod, "Pod", "", "pods");

/// The metadata the watch needs: name and namespace (the object's key),
/// resourceVersion (where a watch resumes), and the one label that ties
/// a slice to its Service.
fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        resource_version: Option<String>,
        #[serde(default, deserialize_with = "service_name_label")]
        labels: Option<BTreeMap<String, String>>,
    }
    let meta = Option::<Meta>::deserialize(d)?;
    Ok(meta
        .map(|m| ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            resource_version: m.resource_version,
            labels: m.labels,
            ..ObjectMeta::default()
        })
        .unwrap_or_default())
}

/// The labels map reduced to `kubernetes.io/service-name`, if present.
fn service_name_label<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Labels;

    impl<'de> Visitor<'de> for Labels {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of labels or null")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = None;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == SERVICE_NAME_LABEL {
                    let value: String = map.next_value()?;
                    kept = Some(BTreeMap::from([(key.into_owned(), value)]));
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(kept)
        }
    }

    d.deserialize_option(Labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    #[test]
    fn keeps_only_what_dns_reads() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abc",
                "namespace": "default",
                "resourceVersion": "42",
                "uid": "u-1",
                "labels": {"app": "web", "kubernetes.io/service-name": "web"},
                "annotations": {"a": "b"},
                "managedFields": [{"manager": "x", "fieldsV1": {"f:x": {}}}]
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.42.0.5"], "hostname": "web-0",
                           "conditions": {"ready": false, "serving": true},
                           "targetRef": {"kind": "Pod", "name": "web-0"}}],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]
        }))
        .unwrap();
        assert_eq!(slice.name_any(), "web-abc");
        assert_eq!(slice.namespace().as_deref(), Some("default"));
        assert_eq!(slice.resource_version().as_deref(), Some("42"));
        assert_eq!(
            slice.labels(),
            &BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), "web".to_owned())])
        );
        assert!(slice.annotations().is_empty());
        let endpoints = slice.endpoints.unwrap();
        assert_eq!(endpoints[0].hostname.as_deref(), Some("web-0"));
        assert_eq!(endpoints[0].conditions.as_ref().unwrap().ready, Some(false));
    }

    #[test]
    fn nulls_and_missing_fields_are_empty() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "labels": null},
            "endpoints": null,
            "ports": null
        }))
        .unwrap();
        assert!(slice.labels().is_empty());
        assert!(slice.endpoints.is_none());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": null,
            "spec": {"hostname": "h", "containers": [{"name": "c", "image": "i"}]},
            "status": {"podIP": "10.42.0.9", "podIPs": null, "phase": "Running"}
        }))
        .unwrap();
        assert_eq!(pod.name_any(), "");
        assert_eq!(pod.spec.unwrap().hostname.as_deref(), Some("h"));
        assert_eq!(pod.status.unwrap().pod_ip.as_deref(), Some("10.42.0.9"));
    }

    #[test]
    fn wrong_types_are_errors_not_panics() {
        let bad = serde_json::from_value::<Service>(serde_json::json!({
            "metadata": {"name": 5}
        }));
        assert!(bad.is_err());
        let bad = serde_json::from_value::<EndpointSlice>(serde_json::json!({
            "metadata": {"labels": {"kubernetes.io/service-name": 5}}
        }));
        assert!(bad.is_err());
    }
}
