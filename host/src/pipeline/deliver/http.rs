//! `HTTPDest`: a POST of each event's JSON document.

use std::time::Duration;

use super::Failed;

/// One POST may take this long.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("event delivery client: {e}"))
}

/// POSTs `body` to `url`: any 2xx takes it; 413 refuses it for good (sending it
/// again cannot help); anything else is worth another try.
pub async fn post(client: &reqwest::Client, url: &str, body: &str) -> Result<(), Failed> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| Failed::Retry(format!("POST {url}: {e}")))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE {
        Err(Failed::Refused(format!("POST {url}: {status}")))
    } else {
        Err(Failed::Retry(format!("POST {url}: {status}")))
    }
}
