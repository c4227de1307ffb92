//! Randomised properties over generated objects and patches (a small seeded
//! generator; no property-testing crate needed).

use serde_json::{Map, Value, json};

use super::{has_directive_keys, strategic};
use crate::apiserver::patch::{PatchType, TypeRef, apply};

const CASES: usize = 3_000;

/// Field names from the Pod schema plus a few unknown ones, so random values hit
/// merge lists, sets, maps and atomic lists.
const FIELDS: &[&str] = &[
    "metadata",
    "labels",
    "finalizers",
    "ownerReferences",
    "uid",
    "spec",
    "containers",
    "name",
    "image",
    "env",
    "value",
    "ports",
    "containerPort",
    "tolerations",
    "volumes",
    "args",
    "status",
    "conditions",
    "type",
    "x",
];

const DIRECTIVES: &[&str] = &[
    "$patch",
    "$retainKeys",
    "$setElementOrder/containers",
    "$setElementOrder/env",
    "$setElementOrder/finalizers",
    "$deleteFromPrimitiveList/finalizers",
    "$deleteFromPrimitiveList/args",
];

const NAMES: &[&str] = &["a", "b", "c", "d"];

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// What the generator may produce.
#[derive(Clone, Copy)]
struct Shape {
    directives: bool,
    arrays: bool,
}

fn value(rng: &mut Rng, depth: usize, shape: Shape) -> Value {
    let choice = if depth == 0 {
        rng.below(4)
    } else {
        rng.below(8)
    };
    match choice {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(rng.below(4) * 40),
        3 => json!(rng.pick(NAMES)),
        4 | 5 if shape.arrays => {
            let len = rng.below(4);
            Value::Array((0..len).map(|_| list_item(rng, depth - 1, shape)).collect())
        }
        _ => Value::Object(object(rng, depth - 1, shape)),
    }
}

/// List items are mostly named maps, so merge lists find their keys.
fn list_item(rng: &mut Rng, depth: usize, shape: Shape) -> Value {
    if rng.chance(60) {
        let mut item = object(rng, depth, shape);
        for key in ["name", "uid", "containerPort", "type"] {
            if rng.chance(70) {
                item.insert(key.to_owned(), json!(rng.pick(NAMES)));
            }
        }
        Value::Object(item)
    } else {
        value(rng, depth, shape)
    }
}

fn object(rng: &mut Rng, depth: usize, shape: Shape) -> Map<String, Value> {
    let mut map = Map::new();
    for _ in 0..rng.below(4) {
        if shape.directives && rng.chance(15) {
            let key = rng.pick(DIRECTIVES);
            map.insert(key.to_owned(), directive_value(rng, key));
        } else {
            map.insert(rng.pick(FIELDS).to_owned(), value(rng, depth, shape));
        }
    }
    map
}

fn directive_value(rng: &mut Rng, key: &str) -> Value {
    match key {
        "$patch" => json!(rng.pick(&["replace", "delete", "merge", "bogus"])),
        "$retainKeys" => Value::Array((0..rng.below(4)).map(|_| json!(rng.pick(FIELDS))).collect()),
        _ if key.starts_with("$setElementOrder/") && rng.chance(50) => Value::Array(
            (0..rng.below(4))
                .map(|_| json!({"name": rng.pick(NAMES)}))
                .collect(),
        ),
        _ => Value::Array((0..rng.below(4)).map(|_| json!(rng.pick(NAMES))).collect()),
    }
}

fn document(rng: &mut Rng, shape: Shape) -> Value {
    Value::Object(object(rng, 5, shape))
}

#[test]
fn strategic_patches_never_panic_or_leak_directives() {
    let mut rng = Rng(0x5eed_0001);
    let mut applied = 0;
    for _ in 0..CASES {
        let current = document(
            &mut rng,
            Shape {
                directives: false,
                arrays: true,
            },
        );
        let patch = document(
            &mut rng,
            Shape {
                directives: true,
                arrays: true,
            },
        );
        for (group, kind) in [
            ("", "Pod"),
            ("apps", "Deployment"),
            ("example.com", "Widget"),
        ] {
            if let Ok(patched) = strategic(group, kind, &current, &patch) {
                applied += 1;
                assert!(
                    !has_directive_keys(&patched),
                    "directive leaked\ncurrent: {current}\npatch: {patch}\nresult: {patched}"
                );
            }
        }
    }
    // The generator must produce mostly applicable patches to mean anything.
    assert!(applied > CASES, "only {applied} patches applied");
}

#[test]
fn without_lists_or_directives_strategic_equals_merge_patch() {
    let mut rng = Rng(0x5eed_0002);
    let plain = Shape {
        directives: false,
        arrays: false,
    };
    for _ in 0..CASES {
        let current = document(
            &mut rng,
            Shape {
                directives: false,
                arrays: true,
            },
        );
        let patch = document(&mut rng, plain);
        let merged = apply(
            TypeRef::new("example.com", "Widget"),
            &current,
            PatchType::Merge,
            patch.to_string().as_bytes(),
        )
        .expect("merge patches of objects always apply");
        if let Ok(patched) = strategic("example.com", "Widget", &current, &patch) {
            assert_eq!(patched, merged, "\ncurrent: {current}\npatch: {patch}");
        }
    }
}

#[test]
fn directive_free_strategic_patches_are_idempotent() {
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..CASES {
        let current = document(
            &mut rng,
            Shape {
                directives: false,
                arrays: true,
            },
        );
        let patch = document(
            &mut rng,
            Shape {
                directives: false,
                arrays: true,
            },
        );
        if let Ok(once) = strategic("", "Pod", &current, &patch) {
            let twice =
                strategic("", "Pod", &once, &patch).expect("a patch that applied applies again");
            assert_eq!(twice, once, "\ncurrent: {current}\npatch: {patch}");
        }
    }
}

#[test]
fn json_patches_never_panic() {
    let mut rng = Rng(0x5eed_0004);
    let ops = ["add", "remove", "replace", "move", "copy", "test"];
    for _ in 0..CASES {
        let current = document(
            &mut rng,
            Shape {
                directives: false,
                arrays: true,
            },
        );
        let operations: Vec<Value> = (0..rng.below(5))
            .map(|_| {
                let path = random_pointer(&mut rng);
                let from = random_pointer(&mut rng);
                json!({
                    "op": rng.pick(&ops),
                    "path": path,
                    "from": from,
                    "value": value(&mut rng, 2, Shape { directives: false, arrays: true }),
                })
            })
            .collect();
        let body = Value::Array(operations).to_string();
        let _ = apply(
            TypeRef::new("", "Pod"),
            &current,
            PatchType::Json,
            body.as_bytes(),
        );
    }
}

fn random_pointer(rng: &mut Rng) -> String {
    let mut pointer = String::new();
    for _ in 0..rng.below(4) {
        pointer.push('/');
        match rng.below(4) {
            0 => pointer.push_str(&rng.below(3).to_string()),
            1 => pointer.push('-'),
            _ => pointer.push_str(rng.pick(FIELDS)),
        }
    }
    pointer
}
