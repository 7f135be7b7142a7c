//! Nodes agreeing on what a refresh sends (README "Fleet"): every node records, per credential,
//! the provider settings it would refresh with — secrets as fingerprints — and compares them
//! with the other nodes'. Sinks and hooks may differ between nodes; these may not, since one
//! node's refresh spends the refresh token for all of them.

use tokio_postgres::{Client, Error};

/// Where the settings of one node and those of another differ, for one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    pub credential: String,
    pub other_node: String,
    /// When the other node recorded its settings (unix seconds): a node that is gone for good
    /// keeps its last record until another node with its name starts.
    pub other_recorded_at: i64,
    /// `field: X here, Y there`, one per field that differs (secrets by fingerprint).
    pub fields: Vec<String>,
}

impl std::fmt::Display for Disagreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "credential {}: this node's provider settings differ from node {}'s (recorded {}): {}",
            self.credential,
            self.other_node,
            crate::clock::rfc3339(self.other_recorded_at),
            self.fields.join("; ")
        )
    }
}

/// Every credential of `config` with its settings as recorded (name, encoded).
pub fn of_config(config: &crate::config::Config) -> Vec<(String, String)> {
    config.credentials.iter().map(|c| (c.name.to_string(), encode(&c.endpoint.shared_settings()))).collect()
}

/// One credential's settings as stored: `field=value` lines in a fixed order.
fn encode(fields: &[(&'static str, String)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}={}\n", v.replace('\n', " "))).collect()
}

fn differing(ours: &str, theirs: &str) -> Vec<String> {
    let parse = |text: &str| -> Vec<(String, String)> {
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let (ours, theirs) = (parse(ours), parse(theirs));
    let value = |list: &[(String, String)], key: &str| list.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let mut seen = std::collections::HashSet::new();
    ours.iter()
        .chain(theirs.iter())
        .map(|(k, _)| k)
        .filter(|k| seen.insert(k.as_str()))
        .filter_map(|k| {
            let (a, b) = (value(&ours, k), value(&theirs, k));
            (a != b)
                .then(|| format!("{k}: {} here, {} there", a.as_deref().unwrap_or("-"), b.as_deref().unwrap_or("-")))
        })
        .collect()
}

async fn disagreements(c: &Client, node: &str, settings: &[(String, String)]) -> Result<Vec<Disagreement>, Error> {
    let names: Vec<&str> = settings.iter().map(|(n, _)| n.as_str()).collect();
    let rows = c
        .query(
            "SELECT credential, node, settings, extract(epoch FROM recorded_at)::bigint FROM tokend_node_settings
             WHERE node <> $1 AND credential = ANY($2) ORDER BY credential, node",
            &[&node, &names],
        )
        .await?;
    let mut found = Vec::new();
    for row in rows {
        let (credential, other_node, theirs, other_recorded_at): (String, String, String, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
        let Some((_, ours)) = settings.iter().find(|(n, _)| *n == credential) else { continue };
        let fields = differing(ours, &theirs);
        if !fields.is_empty() {
            found.push(Disagreement { credential, other_node, other_recorded_at, fields });
        }
    }
    Ok(found)
}

/// Replaces this node's record with `settings` (credential, encoded) and returns where other
/// nodes' records differ.
pub async fn record(c: &mut Client, node: &str, settings: &[(String, String)]) -> Result<Vec<Disagreement>, Error> {
    let tx = c.transaction().await?;
    tx.execute("DELETE FROM tokend_node_settings WHERE node = $1", &[&node]).await?;
    let (names, texts): (Vec<&str>, Vec<&str>) = settings.iter().map(|(n, s)| (n.as_str(), s.as_str())).unzip();
    tx.execute(
        "INSERT INTO tokend_node_settings (node, credential, settings)
         SELECT $1, credential, settings FROM unnest($2::text[], $3::text[]) AS t(credential, settings)",
        &[&node, &names, &texts],
    )
    .await?;
    tx.commit().await?;
    disagreements(c, node, settings).await
}

/// Where other nodes' records differ from `settings`, without recording anything (`tokend check`).
pub async fn compare(c: &Client, node: &str, settings: &[(String, String)]) -> Result<Vec<Disagreement>, Error> {
    disagreements(c, node, settings).await
}

/// A node that stops cleanly takes its record away: only running (or crashed) nodes are compared.
pub async fn forget(c: &Client, node: &str) -> Result<(), Error> {
    c.execute("DELETE FROM tokend_node_settings WHERE node = $1", &[&node]).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_fields_that_differ_are_named() {
        let ours = encode(&[("token_url", "https://a/token".into()), ("client_secret", "fp:1111".into())]);
        let theirs = encode(&[("token_url", "https://a/token".into()), ("client_secret", "fp:2222".into())]);
        assert_eq!(differing(&ours, &theirs), vec!["client_secret: fp:1111 here, fp:2222 there"]);
        assert!(differing(&ours, &ours).is_empty());
        let fewer = encode(&[("token_url", "https://a/token".into())]);
        assert_eq!(differing(&ours, &fewer), vec!["client_secret: fp:1111 here, - there"]);
    }
}
