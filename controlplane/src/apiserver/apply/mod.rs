//! Server-side apply: field ownership (managedFields), conflicts and the merge of applied configurations.
