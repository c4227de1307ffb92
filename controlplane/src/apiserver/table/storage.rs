//! Storage kinds: PersistentVolumes, PersistentVolumeClaims and
//! StorageClasses.

use super::format::quantity;
use super::value::Obj;
use super::{AGE, Column, NAME, Printer};

/// The pre-GA way to name a class, which still wins over the field.
const BETA_STORAGE_CLASS_ANNOTATION: &str = "volume.beta.kubernetes.io/storage-class";
const DEFAULT_CLASS_ANNOTATIONS: [&str; 2] = [
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
];

const VOLUME_ATTRIBUTES_CLASS: Column = Column::new(
    "VolumeAttributesClass",
    "string",
    "The volume attributes class, if any.",
);
const VOLUME_MODE: Column = Column::new("VolumeMode", "string", "Filesystem or Block.").wide();

pub(super) static PERSISTENT_VOLUMES: Printer = Printer::new(
    &[
        NAME,
        Column::new("Capacity", "string", "Storage capacity of the volume."),
        Column::new(
            "Access Modes",
            "string",
            "How the volume can be mounted: RWO, ROX, RWX, RWOP.",
        ),
        Column::new(
            "Reclaim Policy",
            "string",
            "What happens to the volume when its claim is released.",
        ),
        Column::new("Status", "string", "Available, Bound, Released or Failed."),
        Column::new(
            "Claim",
            "string",
            "The claim bound to the volume, as namespace/name.",
        ),
        Column::new("StorageClass", "string", "The volume's storage class."),
        VOLUME_ATTRIBUTES_CLASS,
        Column::new("Reason", "string", "Why the volume is in its phase."),
        AGE,
        VOLUME_MODE,
    ],
    |pv, ctx| {
        let claim = pv.at("spec.claimRef");
        let claim = if claim.is_set() {
            format!(
                "{}/{}",
                claim.get("namespace").str(),
                claim.get("name").str()
            )
        } else {
            String::new()
        };
        cells![
            pv.at("metadata.name").str(),
            quantity(pv.at("spec.capacity.storage")),
            access_modes(pv.at("spec.accessModes")),
            pv.at("spec.persistentVolumeReclaimPolicy").str(),
            phase(pv),
            claim,
            storage_class(pv),
            pv.at("spec.volumeAttributesClassName")
                .opt_str()
                .unwrap_or("<unset>"),
            pv.at("status.reason").str(),
            ctx.age(pv),
            pv.at("spec.volumeMode").opt_str().unwrap_or("<unset>"),
        ]
    },
);

pub(super) static PERSISTENT_VOLUME_CLAIMS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Status", "string", "Pending, Bound or Lost."),
        Column::new("Volume", "string", "The volume bound to the claim."),
        Column::new(
            "Capacity",
            "string",
            "Storage capacity of the bound volume.",
        ),
        Column::new(
            "Access Modes",
            "string",
            "Access modes of the bound volume.",
        ),
        Column::new("StorageClass", "string", "The claim's storage class."),
        VOLUME_ATTRIBUTES_CLASS,
        AGE,
        VOLUME_MODE,
    ],
    |pvc, ctx| {
        let volume = pvc.at("spec.volumeName").str();
        // Capacity and modes are the bound volume's, so only once bound.
        let (capacity, modes) = if volume.is_empty() {
            (String::new(), String::new())
        } else {
            (
                quantity(pvc.at("status.capacity.storage")),
                access_modes(pvc.at("status.accessModes")),
            )
        };
        cells![
            pvc.at("metadata.name").str(),
            phase(pvc),
            volume,
            capacity,
            modes,
            storage_class(pvc),
            pvc.at("spec.volumeAttributesClassName")
                .opt_str()
                .unwrap_or("<unset>"),
            ctx.age(pvc),
            pvc.at("spec.volumeMode").opt_str().unwrap_or("<unset>"),
        ]
    },
);

pub(super) static STORAGE_CLASSES: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Provisioner",
            "string",
            "The provisioner that creates volumes of this class.",
        ),
        Column::new(
            "ReclaimPolicy",
            "string",
            "Reclaim policy of volumes of this class.",
        ),
        Column::new(
            "VolumeBindingMode",
            "string",
            "When volumes are bound: Immediate or WaitForFirstConsumer.",
        ),
        Column::new(
            "AllowVolumeExpansion",
            "string",
            "Whether claims of this class may grow.",
        ),
        AGE,
    ],
    |sc, ctx| {
        let annotations = sc.at("metadata.annotations");
        let is_default = DEFAULT_CLASS_ANNOTATIONS
            .iter()
            .any(|a| annotations.get(a).str() == "true");
        let name = sc.at("metadata.name").str();
        cells![
            if is_default {
                format!("{name} (default)")
            } else {
                name.to_string()
            },
            sc.get("provisioner").str(),
            sc.get("reclaimPolicy").opt_str().unwrap_or("Delete"),
            sc.get("volumeBindingMode").opt_str().unwrap_or("Immediate"),
            sc.get("allowVolumeExpansion").bool(),
            ctx.age(sc),
        ]
    },
);

/// `status.phase`, or `Terminating` while being deleted.
fn phase(object: Obj<'_>) -> String {
    if object.at("metadata.deletionTimestamp").is_set() {
        "Terminating".into()
    } else {
        object.at("status.phase").str().into()
    }
}

/// Access modes abbreviated, in a fixed order, without duplicates.
fn access_modes(modes: Obj<'_>) -> String {
    const ABBREVIATIONS: [(&str, &str); 4] = [
        ("ReadWriteOnce", "RWO"),
        ("ReadOnlyMany", "ROX"),
        ("ReadWriteMany", "RWX"),
        ("ReadWriteOncePod", "RWOP"),
    ];
    let present: Vec<&str> = modes.items().map(|m| m.str()).collect();
    let shown: Vec<&str> = ABBREVIATIONS
        .iter()
        .filter(|(mode, _)| present.contains(mode))
        .map(|(_, short)| *short)
        .collect();
    shown.join(",")
}

/// The beta annotation if set, else `spec.storageClassName`.
fn storage_class(object: Obj<'_>) -> &str {
    object
        .at("metadata.annotations")
        .get(BETA_STORAGE_CLASS_ANNOTATION)
        .opt_str()
        .unwrap_or_else(|| object.at("spec.storageClassName").str())
}
