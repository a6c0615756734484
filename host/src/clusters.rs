//! Clusters and nodes (Appendix A) on the single-machine backend.
//!
//! The machine xpud runs on is the one node there is. A cluster is a logical group
//! of nodes: creating one claims this machine if it is free and satisfies the
//! cluster's node spec, and otherwise ends in `create_failed` with the reason: no
//! `running` cluster exists without a node behind it. A node belongs to at most one
//! cluster at a time.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::store::{Change, Store, Table};

// What a cluster is asked to be (tables A.11-A.14): stored as sent, so the wire
// layer reads and writes these types too.

/// Table A.11.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// One of the text's Kubernetes versions: 1.18.x, 1.20.x, 1.22.x, 1.24.x.
    #[schema(pattern = r"^1\.(18|20|22|24)\.[0-9]+$")]
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<String>,
    #[schema(min_items = 1)]
    pub nodes: Vec<NodeSpec>,
}

/// Table A.12.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    pub node_resource: ResourceSpec,
    #[schema(minimum = 1)]
    pub count: u32,
}

/// Table A.13. Memory and disks in GB.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSpec {
    pub cpu: u32,
    pub mem: u32,
    pub root_disk_size: u32,
    pub local_disk_size: u32,
    /// The text's example writes one object where the table says a list: both parse.
    #[serde(default, deserialize_with = "one_or_many")]
    #[schema(value_type = Vec<XpuResource>)]
    pub xpu_resources: Vec<XpuResource>,
}

/// Table A.14.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct XpuResource {
    pub xpu_type: String,
    pub num: u32,
    /// In answers: these cards are simulated (no hardware behind them; loaded
    /// because the operator asked). Not in table A.14; ignored in requests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schema(read_only)]
    pub simulated: bool,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<XpuResource>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(XpuResource),
        Many(Vec<XpuResource>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(x)) => vec![x],
        Some(OneOrMany::Many(v)) => v,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClusterStatus {
    Creating,
    Running,
    CreateFailed,
    Deleting,
    Deleted,
    DeleteFailed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Numeric id (the monitors of Appendix C report one).
    pub id: u64,
    pub code: String,
    pub name: String,
    pub region_id: Option<String>,
    pub spec: ClusterSpec,
    pub status: ClusterStatus,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    pub created_ms: u64,
}

/// This machine as a node of a cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    pub cluster_code: String,
    /// What the cluster asked of the node.
    pub resource: ResourceSpec,
    pub created_ms: u64,
}

/// What this machine can give a cluster.
#[derive(Clone, Debug)]
pub struct NodeOffer {
    pub node_id: String,
    pub cpu: u32,
    pub memory_gb: f64,
    /// None when the data directory's disk is not found: disk asks cannot be
    /// checked, and are refused.
    pub disk_gb: Option<f64>,
    pub xpus: Vec<XpuResource>,
}

impl NodeOffer {
    /// Every way `resource` exceeds this machine, or none.
    fn shortfalls(&self, resource: &ResourceSpec) -> Vec<String> {
        let mut missing = Vec::new();
        if resource.cpu > self.cpu {
            missing.push(format!("cpu {} > {} cores", resource.cpu, self.cpu));
        }
        if f64::from(resource.mem) > self.memory_gb {
            missing.push(format!(
                "mem {} GB > {:.1} GB",
                resource.mem, self.memory_gb
            ));
        }
        let disk = u64::from(resource.root_disk_size) + u64::from(resource.local_disk_size);
        match self.disk_gb {
            Some(have) if disk as f64 > have => missing.push(format!(
                "rootDiskSize + localDiskSize {disk} GB > {have:.1} GB"
            )),
            None if disk > 0 => missing.push(format!(
                "rootDiskSize + localDiskSize {disk} GB: this machine's disk size is unknown"
            )),
            _ => {}
        }
        for want in &resource.xpu_resources {
            let have = self
                .xpus
                .iter()
                .find(|x| x.xpu_type == want.xpu_type)
                .map_or(0, |x| x.num);
            if want.num > have {
                missing.push(format!("{} x {} > {have} present", want.num, want.xpu_type));
            }
        }
        missing
    }
}

#[derive(Default)]
struct State {
    clusters: Vec<ClusterRecord>,
    nodes: Vec<NodeRecord>,
}

pub struct Clusters {
    store: Arc<Store>,
    state: RwLock<State>,
}

/// Kubernetes versions the text offers (table A.11).
const VERSIONS: [&str; 4] = ["1.18.", "1.20.", "1.22.", "1.24."];

fn validate_spec(spec: &ClusterSpec) -> Result<()> {
    let version_ok = VERSIONS.iter().any(|prefix| {
        spec.version
            .strip_prefix(prefix)
            .is_some_and(|patch| !patch.is_empty() && patch.chars().all(|c| c.is_ascii_digit()))
    });
    if !version_ok {
        return Err(Error::Invalid(format!(
            "spec.version {:?}: one of 1.18.x, 1.20.x, 1.22.x, 1.24.x",
            spec.version
        )));
    }
    if spec.nodes.is_empty() {
        return Err(Error::Invalid("spec.nodes: at least one node spec".into()));
    }
    for (i, node) in spec.nodes.iter().enumerate() {
        if node.count == 0 {
            return Err(Error::Invalid(format!("spec.nodes[{i}].count: at least 1")));
        }
    }
    Ok(())
}

impl Clusters {
    pub fn load(store: Arc<Store>) -> anyhow::Result<Clusters> {
        let state = State {
            clusters: store
                .load(Table::Clusters)?
                .into_iter()
                .map(|(_, c)| c)
                .collect(),
            nodes: store
                .load(Table::Nodes)?
                .into_iter()
                .map(|(_, n)| n)
                .collect(),
        };
        Ok(Clusters {
            store,
            state: RwLock::new(state),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        crate::sync::read(&self.state)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        crate::sync::write(&self.state)
    }

    pub fn list(&self) -> Vec<ClusterRecord> {
        self.read().clusters.clone()
    }

    pub fn get(&self, code: &str) -> Result<ClusterRecord> {
        self.read()
            .clusters
            .iter()
            .find(|c| c.code == code)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no cluster {code:?}")))
    }

    pub fn nodes(&self, code: &str) -> Result<Vec<NodeRecord>> {
        self.get(code)?;
        Ok(self
            .read()
            .nodes
            .iter()
            .filter(|n| n.cluster_code == code)
            .cloned()
            .collect())
    }

    /// The cluster `node_id` belongs to, if any.
    pub fn cluster_of(&self, node_id: &str) -> Option<String> {
        self.read()
            .nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .map(|n| n.cluster_code.clone())
    }

    /// Creates a cluster: `running` with this machine as its node when it can be,
    /// `create_failed` with the reason otherwise. Blocking (writes the store).
    pub fn create(
        &self,
        name: String,
        region_id: Option<String>,
        spec: ClusterSpec,
        offer: &NodeOffer,
    ) -> Result<ClusterRecord> {
        if name.trim().is_empty() {
            return Err(Error::Invalid("name: must not be empty".into()));
        }
        validate_spec(&spec)?;
        let mut state = self.write();
        let wanted: u32 = spec.nodes.iter().map(|n| n.count).sum();
        let holder = state
            .nodes
            .iter()
            .find(|n| n.node_id == offer.node_id)
            .map(|n| n.cluster_code.clone());
        let failure = if wanted > 1 {
            Some(format!(
                "the single-machine backend has one node ({}); the spec asks for {wanted}",
                offer.node_id
            ))
        } else if let Some(holder) = holder {
            Some(format!(
                "node {} already belongs to cluster {holder}",
                offer.node_id
            ))
        } else {
            let missing = offer.shortfalls(&spec.nodes[0].node_resource);
            (!missing.is_empty()).then(|| {
                format!(
                    "node {} cannot satisfy the node spec: {}",
                    offer.node_id,
                    missing.join("; ")
                )
            })
        };
        let code = format!(
            "cluster-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let cluster = ClusterRecord {
            id: state.clusters.iter().map(|c| c.id).max().unwrap_or(0) + 1,
            code: code.clone(),
            name,
            region_id,
            status: if failure.is_some() {
                ClusterStatus::CreateFailed
            } else {
                ClusterStatus::Running
            },
            reason: failure,
            created_ms: crate::dates::now_ms(),
            spec,
        };
        let node = (cluster.status == ClusterStatus::Running).then(|| NodeRecord {
            node_id: offer.node_id.clone(),
            cluster_code: code.clone(),
            resource: cluster.spec.nodes[0].node_resource.clone(),
            created_ms: cluster.created_ms,
        });
        let mut changes = vec![Change::put(Table::Clusters, &code, &cluster)?];
        if let Some(node) = &node {
            changes.push(Change::put(Table::Nodes, &node.node_id, node)?);
        }
        self.store.apply(&changes)?;
        if let Some(reason) = &cluster.reason {
            tracing::info!(cluster = %code, "cluster create_failed: {reason}");
        }
        state.clusters.push(cluster.clone());
        state.nodes.extend(node);
        Ok(cluster)
    }

    /// Deletes a cluster and frees its nodes. Blocking.
    pub fn delete(&self, code: &str) -> Result<()> {
        let mut state = self.write();
        if !state.clusters.iter().any(|c| c.code == code) {
            return Err(Error::NotFound(format!("no cluster {code:?}")));
        }
        let freed: Vec<String> = state
            .nodes
            .iter()
            .filter(|n| n.cluster_code == code)
            .map(|n| n.node_id.clone())
            .collect();
        let mut changes = vec![Change::delete(Table::Clusters, code)];
        changes.extend(freed.iter().map(|id| Change::delete(Table::Nodes, id)));
        self.store.apply(&changes)?;
        state.clusters.retain(|c| c.code != code);
        state.nodes.retain(|n| n.cluster_code != code);
        Ok(())
    }

    /// Adds `count` nodes of `resource` to a running cluster. Blocking.
    pub fn add_nodes(
        &self,
        code: &str,
        count: u32,
        resource: ResourceSpec,
        offer: &NodeOffer,
    ) -> Result<Vec<String>> {
        if count == 0 {
            return Err(Error::Invalid("count: at least 1".into()));
        }
        let mut state = self.write();
        let cluster = state
            .clusters
            .iter()
            .find(|c| c.code == code)
            .ok_or_else(|| Error::NotFound(format!("no cluster {code:?}")))?;
        if cluster.status != ClusterStatus::Running {
            return Err(Error::Conflict(format!(
                "cluster {code} is {:?}, not running",
                cluster.status
            )));
        }
        if let Some(holder) = state.nodes.iter().find(|n| n.node_id == offer.node_id) {
            return Err(Error::Conflict(format!(
                "no free node: the single-machine backend's only node {} belongs to cluster {}",
                offer.node_id, holder.cluster_code
            )));
        }
        if count > 1 {
            return Err(Error::Conflict(format!(
                "count {count}: the single-machine backend has one node"
            )));
        }
        let missing = offer.shortfalls(&resource);
        if !missing.is_empty() {
            return Err(Error::Conflict(format!(
                "node {} cannot satisfy spec.nodeResource: {}",
                offer.node_id,
                missing.join("; ")
            )));
        }
        let node = NodeRecord {
            node_id: offer.node_id.clone(),
            cluster_code: code.to_string(),
            resource,
            created_ms: crate::dates::now_ms(),
        };
        self.store.put(Table::Nodes, &node.node_id, &node)?;
        state.nodes.push(node);
        Ok(vec![offer.node_id.clone()])
    }

    /// Removes nodes from a cluster: all of them, or none if one is not its node.
    pub fn remove_nodes(&self, code: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Invalid("nodeId: at least one node id".into()));
        }
        let mut state = self.write();
        if !state.clusters.iter().any(|c| c.code == code) {
            return Err(Error::NotFound(format!("no cluster {code:?}")));
        }
        if let Some(stranger) = ids.iter().find(|id| {
            !state
                .nodes
                .iter()
                .any(|n| &n.node_id == *id && n.cluster_code == code)
        }) {
            return Err(Error::NotFound(format!(
                "nodeId {stranger:?} is not a node of cluster {code}"
            )));
        }
        let changes: Vec<Change<'_>> = ids
            .iter()
            .map(|id| Change::delete(Table::Nodes, id))
            .collect();
        self.store.apply(&changes)?;
        state
            .nodes
            .retain(|n| !(n.cluster_code == code && ids.contains(&n.node_id)));
        Ok(())
    }
}
