//! Watches the plugin directory: a change is picked up without a restart.
//!
//! File events (inotify through `notify`) are debounced, since copying a plugin in
//! takes several writes, then trigger a scan. A slow periodic scan backs the events
//! up where they are not delivered (network file systems, dropped events).

use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Registry;

/// Quiet time after the last file event before scanning.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// Scan this often even without events.
pub const RESCAN_EVERY: Duration = Duration::from_secs(30);

/// Scans once, then keeps the registry in line with the directory until the
/// returned task is dropped or aborted.
pub async fn watch(registry: Arc<Registry>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes: a scan's own reads raise open/close-nowrite (access) events,
        // which would otherwise trigger the next scan, forever.
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(registry.plugin_dir(), RecursiveMode::NonRecursive)?;
    scan(&registry).await;
    Ok(tokio::spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        loop {
            tokio::select! {
                event = rx.recv() => {
                    if event.is_none() {
                        break;
                    }
                    // Debounce: wait for a quiet period, draining further events.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                }
                _ = tokio::time::sleep(RESCAN_EVERY) => {}
            }
            scan(&registry).await;
        }
    }))
}

async fn scan(registry: &Arc<Registry>) {
    let registry = registry.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || registry.scan()).await {
        tracing::error!("plugin scan failed: {e}");
    }
}
