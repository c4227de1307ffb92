//! Label requirements compiled once per pod and matched without
//! allocation: node selector terms (required and preferred node affinity),
//! label selectors (pod affinity terms) and taint tolerations.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
    /// A requirement the API would have refused: it matches nothing.
    Invalid,
}

/// One `key op values` requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    op: Op,
}

impl Requirement {
    fn new(key: &str, operator: &str, values: Option<&Vec<String>>, numeric: bool) -> Self {
        let values = values.cloned().unwrap_or_default();
        let op = match operator {
            "In" if !values.is_empty() => Op::In(values),
            "NotIn" if !values.is_empty() => Op::NotIn(values),
            "Exists" if values.is_empty() => Op::Exists,
            "DoesNotExist" if values.is_empty() => Op::DoesNotExist,
            "Gt" | "Lt" if numeric && values.len() == 1 => match values[0].parse::<i64>() {
                Ok(n) if operator == "Gt" => Op::Gt(n),
                Ok(n) => Op::Lt(n),
                Err(_) => Op::Invalid,
            },
            _ => Op::Invalid,
        };
        Requirement {
            key: key.to_owned(),
            op,
        }
    }

    /// Whether the requirement holds for a label (or field) value.
    fn matches_value(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (Op::In(values), Some(v)) => values.iter().any(|x| x == v),
            (Op::In(_), None) => false,
            (Op::NotIn(values), Some(v)) => !values.iter().any(|x| x == v),
            (Op::NotIn(_), None) => true,
            (Op::Exists, v) => v.is_some(),
            (Op::DoesNotExist, v) => v.is_none(),
            (Op::Gt(n), Some(v)) => v.parse::<i64>().is_ok_and(|v| v > *n),
            (Op::Lt(n), Some(v)) => v.parse::<i64>().is_ok_and(|v| v < *n),
            (Op::Gt(_) | Op::Lt(_), None) | (Op::Invalid, _) => false,
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        self.matches_value(labels.get(&self.key).map(String::as_str))
    }
}

/// One node selector term: every expression and field requirement holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTerm {
    labels: Vec<Requirement>,
    /// `metadata.name` requirements: the only field upstream allows.
    names: Vec<Requirement>,
    /// Empty or naming an unknown field: matches no node, as upstream.
    never: bool,
}

impl NodeTerm {
    pub fn new(term: &NodeSelectorTerm) -> Self {
        let node_requirement = |r: &NodeSelectorRequirement| {
            Requirement::new(&r.key, &r.operator, r.values.as_ref(), true)
        };
        let labels: Vec<_> = term
            .match_expressions
            .iter()
            .flatten()
            .map(node_requirement)
            .collect();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        let names: Vec<_> = fields
            .iter()
            .filter(|f| f.key == "metadata.name")
            .map(|r| Requirement::new(&r.key, &r.operator, r.values.as_ref(), false))
            .collect();
        let never = (labels.is_empty() && fields.is_empty()) || names.len() != fields.len();
        NodeTerm {
            labels,
            names,
            never,
        }
    }

    pub fn matches(&self, name: &str, labels: &Labels) -> bool {
        !self.never
            && self.labels.iter().all(|r| r.matches(labels))
            && self.names.iter().all(|r| r.matches_value(Some(name)))
    }
}

/// Terms ORed together, as `requiredDuringScheduling...nodeSelectorTerms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSelector {
    terms: Vec<NodeTerm>,
}

impl NodeSelector {
    pub fn new(terms: &[NodeSelectorTerm]) -> Self {
        NodeSelector {
            terms: terms.iter().map(NodeTerm::new).collect(),
        }
    }

    pub fn matches(&self, name: &str, labels: &Labels) -> bool {
        self.terms.iter().any(|t| t.matches(name, labels))
    }
}

/// A `metav1.LabelSelector`: every requirement holds. A missing selector
/// matches nothing, an empty one everything (as upstream's conversion).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMatcher {
    requirements: Vec<Requirement>,
    nothing: bool,
}

impl LabelMatcher {
    pub fn new(selector: Option<&LabelSelector>) -> Self {
        let Some(selector) = selector else {
            return LabelMatcher {
                requirements: Vec::new(),
                nothing: true,
            };
        };
        let mut requirements: Vec<Requirement> = selector
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement {
                key: k.clone(),
                op: Op::In(vec![v.clone()]),
            })
            .collect();
        requirements.extend(
            selector
                .match_expressions
                .iter()
                .flatten()
                .map(|r| Requirement::new(&r.key, &r.operator, r.values.as_ref(), false)),
        );
        LabelMatcher {
            requirements,
            nothing: false,
        }
    }

    /// The selector of a pod affinity term, narrowed by its
    /// `matchLabelKeys` (the pod's own value) and `mismatchLabelKeys` (any
    /// other value), as upstream merges them.
    pub fn with_label_keys(
        selector: Option<&LabelSelector>,
        match_keys: &[String],
        mismatch_keys: &[String],
        own: &Labels,
    ) -> Self {
        let mut matcher = LabelMatcher::new(selector);
        if matcher.nothing {
            return matcher;
        }
        for (keys, matching) in [(match_keys, true), (mismatch_keys, false)] {
            for key in keys {
                if let Some(value) = own.get(key) {
                    let values = vec![value.clone()];
                    matcher.requirements.push(Requirement {
                        key: key.clone(),
                        op: if matching {
                            Op::In(values)
                        } else {
                            Op::NotIn(values)
                        },
                    });
                }
            }
        }
        matcher
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        !self.nothing && self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// Whether `toleration` tolerates `taint` (upstream's `ToleratesTaint`).
pub fn tolerates(toleration: &Toleration, key: &str, value: &str, effect: &str) -> bool {
    let toleration_effect = toleration.effect.as_deref().unwrap_or_default();
    if !toleration_effect.is_empty() && toleration_effect != effect {
        return false;
    }
    let toleration_key = toleration.key.as_deref().unwrap_or_default();
    if !toleration_key.is_empty() && toleration_key != key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or_default() {
        "" | "Equal" => toleration.value.as_deref().unwrap_or_default() == value,
        "Exists" => true,
        _ => false,
    }
}

/// Whether any of `tolerations` tolerates `taint`.
pub fn tolerated(tolerations: &[Toleration], taint: &Taint) -> bool {
    let value = taint.value.as_deref().unwrap_or_default();
    tolerations
        .iter()
        .any(|t| tolerates(t, &taint.key, value, &taint.effect))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn term(value: serde_json::Value) -> NodeTerm {
        NodeTerm::new(&serde_json::from_value(value).expect("term"))
    }

    #[test]
    fn node_terms_follow_upstream_operators() {
        let node = labels(&[("zone", "a"), ("cores", "8"), ("gpu", "")]);
        let cases = [
            (
                json!({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "rack", "operator": "NotIn", "values": ["b"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "rack", "operator": "DoesNotExist"}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "cores", "operator": "Lt", "values": ["4"]}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["4"]}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["x"]}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "zone", "operator": "Bogus", "values": ["a"]}]}),
                false,
            ),
            (
                json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}),
                true,
            ),
            (
                json!({"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}]}),
                false,
            ),
            (
                json!({"matchFields": [{"key": "spec.other", "operator": "In", "values": ["n1"]}]}),
                false,
            ),
            (json!({}), false),
        ];
        for (value, want) in cases {
            assert_eq!(term(value.clone()).matches("n1", &node), want, "{value}");
        }
    }

    #[test]
    fn label_selectors() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let selector = |v: serde_json::Value| -> LabelSelector {
            serde_json::from_value(v).expect("selector")
        };
        assert!(
            LabelMatcher::new(Some(&selector(json!({"matchLabels": {"app": "web"}}))))
                .matches(&pod)
        );
        assert!(
            !LabelMatcher::new(Some(&selector(json!({"matchLabels": {"app": "db"}}))))
                .matches(&pod)
        );
        assert!(LabelMatcher::new(Some(&selector(json!({})))).matches(&pod));
        assert!(!LabelMatcher::new(None).matches(&pod));
        let expr = selector(
            json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["back"]}]}),
        );
        assert!(LabelMatcher::new(Some(&expr)).matches(&pod));
    }

    #[test]
    fn tolerations() {
        let taint = |k: &str, v: &str, e: &str| Taint {
            key: k.into(),
            value: Some(v.into()),
            effect: e.into(),
            time_added: None,
        };
        let toleration =
            |v: serde_json::Value| -> Toleration { serde_json::from_value(v).expect("toleration") };
        let dedicated = taint("dedicated", "gpu", "NoSchedule");
        assert!(tolerated(
            &[toleration(json!({"key": "dedicated", "value": "gpu"}))],
            &dedicated
        ));
        assert!(tolerated(
            &[toleration(
                json!({"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"})
            )],
            &dedicated
        ));
        assert!(tolerated(
            &[toleration(json!({"operator": "Exists"}))],
            &dedicated
        ));
        assert!(!tolerated(
            &[toleration(json!({"key": "dedicated", "value": "cpu"}))],
            &dedicated
        ));
        assert!(!tolerated(
            &[toleration(
                json!({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"})
            )],
            &dedicated
        ));
        assert!(!tolerated(&[], &dedicated));
    }
}
