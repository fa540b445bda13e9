//! The typed answers of the service's control operations: the same structs are returned by
//! [`super::Handle`], sent as JSON over the control socket and printed by the CLI.

use serde::{Deserialize, Serialize};

/// Everything `rcptgate status` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// When this status was taken (Unix seconds).
    pub time: u64,
    /// Generation in service (`None`: nothing loaded, every answer is a temporary failure).
    pub generation: Option<u64>,
    /// Addresses in service, tombstones included.
    pub addresses: Option<u64>,
    /// Accepted domains in service.
    pub domains: Option<u32>,
    /// Segments of the set in service (`None` for a single snapshot; see README, Segments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<usize>,
    /// Seconds since the snapshot in service was built.
    pub snapshot_age: Option<u64>,
    /// Seconds since the data in service was read (what `max_age` counts).
    pub data_age: Option<u64>,
    /// The data is older than `max_age`: unknown recipients are deferred (4xx), not rejected.
    pub stale: bool,
    /// Tombstones in force.
    pub tombstones: usize,
    /// Addresses claimed by two owners in the last build.
    pub conflicts: usize,
    /// Why the last rebuild failed, if it did.
    pub last_error: Option<String>,
    /// Diagnostics (skipped entries, warnings) of the last build: how many, and the first
    /// [`MAX_DIAGNOSTICS`] with their location.
    pub diagnostics: usize,
    /// The first diagnostics of the last build.
    pub diagnostic_lines: Vec<String>,
    /// Removals the deletion guard holds until approved.
    pub held: Option<HeldStatus>,
    /// A rebuild or directory sync running now.
    pub running: Option<Running>,
    /// What the last good build did.
    pub last_build: Option<BuildSummary>,
    /// Why the snapshot or state in service is not on disk yet (it is served from memory;
    /// writing is retried).
    pub persist_error: Option<String>,
    /// The last sync of each LDAP source.
    pub syncs: Vec<SourceSync>,
    /// What the daemon listens on (`policy 127.0.0.1:10040`, …), as announced by the
    /// program that runs the service.
    pub listeners: Vec<String>,
    /// Rebuilds that succeeded and failed since start.
    pub reloads_ok: u64,
    /// See [`Self::reloads_ok`].
    pub reloads_failed: u64,
}

/// What one good build did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSummary {
    /// `published`, `unchanged` or `held`.
    pub outcome: String,
    /// The generation in service after it.
    pub generation: u64,
    /// Addresses served, tombstones included.
    pub addresses: u64,
    /// Live addresses added and removed (removals held included).
    pub added: u64,
    /// See [`Self::added`].
    pub removed: u64,
    /// Removed addresses that became tombstones.
    pub tombstoned: u64,
    /// Tombstones in force.
    pub tombstones: u64,
    /// When it finished (Unix seconds).
    pub time: u64,
}

/// The last sync of one LDAP source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSync {
    /// The source's name.
    pub source: String,
    /// `full`, `incremental` or `unchanged`.
    pub kind: String,
    /// When it was read (Unix seconds).
    pub time: u64,
    /// Addresses the source gave.
    pub addresses: u64,
    /// Objects changed (incremental syncs).
    pub changed: u64,
}

/// How many diagnostics a status carries by text.
pub const MAX_DIAGNOSTICS: usize = 1000;

/// Removals held by the deletion guard. The build's additions and changes are in service;
/// the addresses it would remove keep answering as before until `approve`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldStatus {
    /// The generation published with the removals held back.
    pub generation: u64,
    /// Held since (Unix seconds).
    pub since: u64,
    /// Why, in words (the count, the share and the limits).
    pub reason: String,
    /// Live addresses before the build.
    pub addresses_in_service: u64,
    /// Addresses the build would remove (waiting for approval).
    pub removed: u64,
    /// Addresses the build added (already in service).
    pub added: u64,
    /// The first removals waiting, by address.
    pub removed_sample: Vec<String>,
}

/// A rebuild in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// What started it (`start`, `SIGHUP`, `source changed`, `directory sync due`, …).
    pub reason: String,
    /// Since when (Unix seconds).
    pub since: u64,
}

/// The user conflicts view: tombstones and conflicting claims.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conflicts {
    /// Addresses removed from the directory and still accepted.
    pub tombstones: Vec<TombstoneView>,
    /// Addresses claimed by two owners in the last build.
    pub claims: Vec<Claim>,
}

/// One tombstone as `rcptgate conflicts` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneView {
    /// `local@domain` as the directory stores it.
    pub address: String,
    /// When it left the directory (Unix seconds).
    pub removed: u64,
    /// Seconds of grace left (`None`: kept by hand).
    pub left: Option<u64>,
    /// Kept until it returns or is deleted by hand.
    pub keep: bool,
    /// What it was.
    pub kind: String,
    /// Where its mail went.
    pub route: Option<String>,
    /// Its profile.
    pub profile: Option<String>,
}

/// One address claimed by two owners, and which claim won.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The address.
    pub address: String,
    /// The owner that keeps it, and where that claim came from.
    pub kept_owner: String,
    /// See [`Self::kept_owner`].
    pub kept_origin: String,
    /// The owner that lost it, and where that claim came from.
    pub dropped_owner: String,
    /// See [`Self::dropped_owner`].
    pub dropped_origin: String,
    /// Why the kept claim won.
    pub rule: String,
}

impl Conflicts {
    /// Tombstones and claims as CSV, one row each (`rcptgate conflicts export`).
    pub fn write_csv<W: std::io::Write>(&self, out: W) -> std::io::Result<()> {
        let mut w = csv::Writer::from_writer(out);
        w.write_record([
            "type",
            "address",
            "removed",
            "left_seconds",
            "keep",
            "kind",
            "route",
            "owner",
            "origin",
            "other_owner",
            "other_origin",
            "rule",
        ])?;
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        for t in &self.tombstones {
            w.write_record([
                "tombstone".into(),
                t.address.clone(),
                crate::service::time::when(t.removed),
                t.left.map(|l| l.to_string()).unwrap_or_default(),
                t.keep.to_string(),
                t.kind.clone(),
                opt(&t.route),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ])?;
        }
        for k in &self.claims {
            w.write_record([
                "claim",
                &k.address,
                "",
                "",
                "",
                "",
                "",
                &k.kept_owner,
                &k.kept_origin,
                &k.dropped_owner,
                &k.dropped_origin,
                &k.rule,
            ])?;
        }
        w.flush()
    }
}

/// What approving the held removals did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approved {
    /// The generation in service afterwards.
    pub generation: u64,
    /// Addresses removed by the approval.
    pub removed: u64,
}

/// What one rebuild did, as the service reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Rebuilt {
    /// A new generation is in service.
    Published {
        /// Its generation.
        generation: u64,
        /// Its addresses.
        addresses: u64,
    },
    /// The sources say what the snapshot in service says; it stays.
    Unchanged {
        /// The generation in service.
        generation: u64,
    },
    /// The deletion guard holds the build's removals; its other changes are in service.
    Held {
        /// The generation in service.
        generation: u64,
        /// Removals waiting for approval.
        removed: u64,
    },
}

/// One control reply on the wire: a typed answer, or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// `status`.
    Status(Box<Status>),
    /// `conflicts`.
    Conflicts(Conflicts),
    /// `approve`.
    Approved(Approved),
    /// `delete`: these tombstones are gone.
    Deleted {
        /// The addresses.
        addresses: Vec<String>,
    },
    /// `keep`: these tombstones are kept.
    Kept {
        /// The addresses.
        addresses: Vec<String>,
    },
    /// `reload`.
    Rebuilt(Rebuilt),
    /// `provision`: the object's addresses are in service from this generation.
    Provisioned {
        /// The generation in service after it.
        generation: u64,
        /// The object's addresses.
        addresses: Vec<String>,
    },
    /// `explain`: one per address.
    Explained {
        /// In the order asked.
        explanations: Vec<crate::directory::explain::Explanation>,
    },
    /// The command failed.
    Error {
        /// Why.
        message: String,
    },
}
