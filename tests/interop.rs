//! What a platform that only read the standard, and a newcomer's tools, need from
//! the server: bodies refused before they are sent, figures present from the first
//! request.

use crate::support::*;

#[test]
fn an_oversized_body_is_refused_before_it_is_sent() {
    use std::io::{Read, Write};
    let server = TestServer::start_with(&[], |c| c.tls.insecure_http = true);
    let address = server.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "POST /CAP/AlgoTasks HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 52428800\r\n\
         Expect: 100-continue\r\n\r\n",
        server.client.token
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.contains("52428800 bytes is larger than"), "{answer}");
}

#[test]
fn host_figures_are_there_before_the_listener_opens() {
    // D.5's figures are required Doubles: the machine and its drivers are sampled
    // before the server can be asked, not 0.0 or null for the first seconds.
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    let data = tempfile::tempdir().unwrap();
    let config = xpud::config::ServeConfig {
        data_dir: data.path().to_path_buf(),
        plugin_dir: Some(plugins.path().to_path_buf()),
        listen: "127.0.0.1:0".parse().unwrap(),
        runtime: xpud::config::RuntimeConfig {
            simulated_devices: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(xpud::server::Server::start(&config))
        .unwrap();
    let first = server.app.machine.latest().expect("a machine sample");
    assert!(first.memory_total_gb > 0.0);
    assert_eq!(
        first.xpus.len(),
        2,
        "sim-xpu's cards are in the first sample"
    );
}

#[test]
fn a_task_and_its_actions_advertise_only_their_own_methods() {
    use reqwest::Method;
    let server = TestServer::start(&[]);
    let api = &server.client;
    // The task is read and deleted; POST belongs to its actions only.
    for method in [Method::OPTIONS, Method::PUT, Method::POST] {
        assert_eq!(
            api.allow(method, "/CAP/AlgoTasks/t-1"),
            (405, "GET,HEAD,DELETE".to_string())
        );
    }
    for path in ["/CAP/AlgoTasks/t-1:pause", "/CAP/AlgoTasks/t-1:resume"] {
        for method in [Method::OPTIONS, Method::GET, Method::DELETE] {
            assert_eq!(api.allow(method, path), (405, "POST".to_string()), "{path}");
        }
        // Posted, an action on a task that does not exist is a 404, not a 405.
        assert_eq!(api.allow(Method::POST, path).0, 404, "{path}");
    }
    assert_eq!(api.allow(Method::GET, "/CAP/AlgoTasks/t-1").0, 404);
}
