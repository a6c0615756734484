//! The OpenAPI document at `/openapi.json`: it lists every endpoint of the standard
//! that xpud serves, and everything it lists is served.

use std::collections::BTreeSet;

use crate::support::*;

/// The served sections of the standard, by appendix.
const SECTIONS: &[(char, std::ops::RangeInclusive<u32>)] = &[
    ('A', 2..=9),
    ('B', 2..=8),
    ('C', 2..=3),
    ('D', 5..=5),
    ('E', 2..=9),
    ('F', 2..=5),
    ('G', 2..=7),
    ('H', 5..=5),
    ('I', 2..=7),
];

#[test]
fn the_document_covers_every_served_endpoint_and_only_those() {
    let server = TestServer::start(&["sim-xpu"]);
    let (status, document) = server.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));

    let mut documented = BTreeSet::new();
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let summary = operation["summary"].as_str().unwrap_or_default();
            // "A.4: List the clusters." names its section.
            if let Some((section, _)) = summary.split_once(':') {
                if section.len() == 3 && section.as_bytes()[1] == b'.' {
                    assert!(documented.insert(section.to_string()), "{section} twice");
                }
            }
            assert!(operation["operationId"].is_string(), "{method} {path}");
            operations.push((method.to_uppercase(), path.clone()));
        }
    }
    let expected: BTreeSet<String> = SECTIONS
        .iter()
        .flat_map(|(appendix, numbers)| numbers.clone().map(move |n| format!("{appendix}.{n}")))
        .collect();
    assert_eq!(expected.len(), 43);
    assert_eq!(documented, expected);

    // Everything documented is routed: no call lands in the fallbacks, whose
    // messages say "no such endpoint" (404) or "does not take" (405).
    for (method, path) in operations {
        let concrete = path.replace('{', "probe-").replace('}', "");
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let body = (method != reqwest::Method::GET).then(|| serde_json::json!({}));
        let (status, body) = server.call(method.clone(), &concrete, body);
        let message = body["message"]
            .as_str()
            .or(body["msg"].as_str())
            .unwrap_or_default();
        assert!(
            status != 405 && !message.starts_with("no such endpoint"),
            "{method} {concrete}: {status} {body}"
        );
    }
}

#[test]
fn alternative_spellings_are_served_but_documented_once() {
    let server = TestServer::start(&[]);
    let (_, document) = server.get("/openapi.json");
    let paths = document["paths"].as_object().unwrap();
    assert!(paths.contains_key("/CCP/algoService/workloads"));
    assert!(!paths.contains_key("/CCP/algoservice/workloads"));
    assert!(!paths.contains_key("/CAD/machine/algorithmPackages"));
    let (status, body) = server.get("/CCP/algoservice/workloads?clusterCode=none");
    assert_eq!(status, 404, "{body}");
    assert!(body["message"].as_str().unwrap().contains("none"), "{body}");
    let (status, body) = server.get("/CAD/machine/algorithmPackages");
    assert_eq!(status, 200, "{body}");
}
