//! `eventDest.mqDest` (Kafka): each event's JSON document as one record.
//!
//! Through `rskafka`, a pure-Rust client (no librdkafka to build). It has no
//! partitioner, so this module is one: a task's records are keyed by its id and
//! all go to the same partition (FNV-1a of the key over the topic's partitions),
//! so that a consumer reads one task's events in the order they were raised, as a
//! keyed Kafka producer would place them. Clients are shared per broker list
//! across tasks and dropped after a failure, so the next attempt connects afresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use rskafka::BackoffConfig;

use super::Failed;

/// One produce (connecting included) may take this long.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Producers shared by every task's delivery.
#[derive(Default)]
pub struct Producers {
    /// By broker list (as given, comma-joined).
    clients: Mutex<HashMap<String, Arc<Client>>>,
    /// By (broker list, topic, partition).
    partitions: Mutex<HashMap<(String, String, i32), Arc<PartitionClient>>>,
    /// A topic's partitions, by (broker list, topic).
    layout: Mutex<HashMap<(String, String), Vec<i32>>>,
}

impl Producers {
    /// Appends `values` to `topic` on `brokers`, keyed by `key`, in one request.
    pub async fn produce(
        &self,
        brokers: &[String],
        topic: &str,
        key: &str,
        values: &[&str],
    ) -> Result<(), Failed> {
        let cluster = brokers.join(",");
        let produced = tokio::time::timeout(
            PRODUCE_TIMEOUT,
            self.try_produce(&cluster, brokers, topic, key, values),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Failed::Retry(format!(
                "Kafka {cluster}: no answer within {PRODUCE_TIMEOUT:?}"
            )))
        });
        if let Err(Failed::Retry(_)) = &produced {
            self.forget(&cluster);
        }
        produced
    }

    async fn try_produce(
        &self,
        cluster: &str,
        brokers: &[String],
        topic: &str,
        key: &str,
        values: &[&str],
    ) -> Result<(), Failed> {
        let failed = |e: KafkaError| classify(cluster, topic, e);
        let client = self.client(cluster, brokers).await.map_err(failed)?;
        let partition = self.partition_of(&client, cluster, topic, key).await?;
        let producer = self
            .partition_client(&client, cluster, topic, partition)
            .await
            .map_err(failed)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let timestamp = chrono::DateTime::from_timestamp_millis(now).unwrap_or_default();
        let records = values
            .iter()
            .map(|value| Record {
                key: Some(key.as_bytes().to_vec()),
                value: Some(value.as_bytes().to_vec()),
                headers: Default::default(),
                timestamp,
            })
            .collect();
        producer
            .produce(records, Compression::NoCompression)
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn client(&self, cluster: &str, brokers: &[String]) -> Result<Arc<Client>, KafkaError> {
        if let Some(client) = crate::sync::lock(&self.clients).get(cluster) {
            return Ok(client.clone());
        }
        // Connected outside the lock: a broker that does not answer holds up no
        // other task's delivery.
        let client = Arc::new(
            ClientBuilder::new(brokers.to_vec())
                .client_id("xpud")
                .backoff_config(BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                    deadline: Some(PRODUCE_TIMEOUT / 2),
                })
                .build()
                .await?,
        );
        crate::sync::lock(&self.clients).insert(cluster.to_string(), client.clone());
        Ok(client)
    }

    /// The partition `key`'s records go to.
    async fn partition_of(
        &self,
        client: &Client,
        cluster: &str,
        topic: &str,
        key: &str,
    ) -> Result<i32, Failed> {
        let at = (cluster.to_string(), topic.to_string());
        let known = crate::sync::lock(&self.layout).get(&at).cloned();
        let partitions = match known {
            Some(partitions) => partitions,
            None => {
                let topics = client
                    .list_topics()
                    .await
                    .map_err(|e| classify(cluster, topic, e))?;
                let Some(found) = topics.into_iter().find(|t| t.name == topic) else {
                    return Err(Failed::Retry(format!(
                        "Kafka {cluster}: topic {topic} does not exist"
                    )));
                };
                let partitions: Vec<i32> = found.partitions.into_iter().collect();
                crate::sync::lock(&self.layout).insert(at, partitions.clone());
                partitions
            }
        };
        if partitions.is_empty() {
            return Err(Failed::Retry(format!(
                "Kafka {cluster}: topic {topic} has no partitions"
            )));
        }
        Ok(partitions[(fnv1a(key.as_bytes()) % partitions.len() as u64) as usize])
    }

    async fn partition_client(
        &self,
        client: &Client,
        cluster: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Arc<PartitionClient>, KafkaError> {
        let at = (cluster.to_string(), topic.to_string(), partition);
        if let Some(producer) = crate::sync::lock(&self.partitions).get(&at) {
            return Ok(producer.clone());
        }
        let producer = Arc::new(
            client
                .partition_client(topic, partition, UnknownTopicHandling::Error)
                .await?,
        );
        crate::sync::lock(&self.partitions).insert(at, producer.clone());
        Ok(producer)
    }

    /// Drops what is cached for `cluster`: the next attempt connects and reads the
    /// topics' layout again.
    fn forget(&self, cluster: &str) {
        crate::sync::lock(&self.clients).remove(cluster);
        crate::sync::lock(&self.partitions).retain(|(c, _, _), _| c != cluster);
        crate::sync::lock(&self.layout).retain(|(c, _), _| c != cluster);
    }
}

/// A record the broker will never take (too large) is refused; the rest is worth
/// another try.
fn classify(cluster: &str, topic: &str, error: KafkaError) -> Failed {
    match error {
        KafkaError::ServerError {
            protocol_error:
                protocol_error @ (ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge),
            ..
        } => Failed::Refused(format!("Kafka {cluster} topic {topic}: {protocol_error}")),
        KafkaError::ServerError { protocol_error, .. } => {
            Failed::Retry(format!("Kafka {cluster} topic {topic}: {protocol_error}"))
        }
        other => Failed::Retry(format!("Kafka {cluster} topic {topic}: {other}")),
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms, so a task's partition
/// does not move when xpud is upgraded.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
