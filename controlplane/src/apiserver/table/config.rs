//! Configuration kinds: ConfigMaps, Secrets and ServiceAccounts.

use std::collections::BTreeSet;

use super::{AGE, Column, NAME, Printer};

pub(super) static CONFIG_MAPS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Data", "string", "Number of keys in data and binaryData."),
        AGE,
    ],
    |cm, ctx| {
        cells![
            cm.at("metadata.name").str(),
            (cm.get("data").len() + cm.get("binaryData").len()) as i64,
            ctx.age(cm),
        ]
    },
);

pub(super) static SECRETS: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Type",
            "string",
            "The kind of secret, such as Opaque or kubernetes.io/tls.",
        ),
        Column::new("Data", "string", "Number of keys in the secret."),
        AGE,
    ],
    |secret, ctx| {
        // stringData is merged into data on write; count a key once even if
        // a stored object still carries both.
        let keys: BTreeSet<&str> = secret
            .get("data")
            .entries()
            .chain(secret.get("stringData").entries())
            .map(|(k, _)| k)
            .collect();
        cells![
            secret.at("metadata.name").str(),
            secret.get("type").str(),
            keys.len() as i64,
            ctx.age(secret),
        ]
    },
);

pub(super) static SERVICE_ACCOUNTS: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Secrets",
            "string",
            "Number of secrets listed for the account.",
        ),
        AGE,
    ],
    |sa, ctx| {
        cells![
            sa.at("metadata.name").str(),
            sa.get("secrets").len() as i64,
            ctx.age(sa),
        ]
    },
);
