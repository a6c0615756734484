//! A stand-in for the platform's side of the registration calls (D.2-D.4 and
//! H.2-H.4), to watch an xpud register, keep alive and unregister locally.
//!
//! ```sh
//! cargo run -p xpud --example platform-standin -- 127.0.0.1:9000
//! # then, in xpud's config:  [platform]  url = "http://127.0.0.1:9000"  modes = ["cap", "cad"]
//! # and serve with --insecure-http: the stand-in speaks plain HTTP, and xpud sends
//! # its platform credentials to a plain-HTTP platform only in that mode
//! ```
//!
//! Every call is printed as one JSON line (passwords masked) and answered with
//! success in its appendix's envelope.

use axum::extract::Path;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

async fn acp(Path(call): Path<String>, Json(body): Json<Value>) -> Json<Value> {
    log("ACP", &call, body);
    Json(json!({ "code": 0, "message": "success", "data": {} }))
}

async fn cad(Path(call): Path<String>, Json(body): Json<Value>) -> Json<Value> {
    log("CAD", &call, body);
    Json(json!({ "code": "0", "message": "success", "data": null }))
}

fn log(family: &str, call: &str, mut body: Value) {
    if body.get("password").is_some() {
        body["password"] = json!("***");
    }
    println!(
        "{}",
        json!({ "family": family, "call": call, "body": body })
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let app = Router::new()
        .route("/ACP/{call}", post(acp))
        .route("/CAD/machine/{call}", post(cad));
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("platform stand-in listening on http://{listen}");
    axum::serve(listener, app).await?;
    Ok(())
}
