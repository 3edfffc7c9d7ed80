//! `openapi.yaml` is the contract: its operations are exactly the router's, and its examples
//! parse into the daemon's types (requests with unknown fields refused; responses round-trip).

use std::collections::BTreeSet;

use hostd::host::HostUpdate;
use hostd::registry::{HostMemory, VmInfo, VmList};
use hostd::routes::{parse_json, DaemonInfo};
use hostd::spec::{MemoryPatch, VmSpec};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn doc() -> Value {
    serde_yaml_ng::from_str(hostd::OPENAPI_YAML).expect("openapi.yaml is valid YAML")
}

#[test]
fn document_and_router_have_the_same_operations() {
    let doc = doc();
    let mut in_doc = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (key, _) in item.as_object().unwrap() {
            if key != "parameters" {
                in_doc.insert((key.to_uppercase(), path.clone()));
            }
        }
    }
    let in_router: BTreeSet<_> = hostd::routes::routes()
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(in_doc, in_router, "openapi.yaml and the router differ");
}

fn check_request<T: DeserializeOwned>(doc: &Value, method: &str, path: &str) {
    let ex = &doc["paths"][path][method]["requestBody"]["content"]["application/json"]["example"];
    assert!(!ex.is_null(), "{method} {path} has no request example");
    let body = axum::body::Bytes::from(serde_json::to_vec(ex).unwrap());
    if let Err(f) = parse_json::<T>(Ok(body)) {
        panic!("example of {method} {path} is refused: {}", f.message);
    }
}

fn check_response<T: DeserializeOwned + Serialize>(doc: &Value, method: &str, path: &str) {
    let ex =
        &doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["example"];
    assert!(!ex.is_null(), "{method} {path} has no 200 example");
    let parsed: T = serde_json::from_value(ex.clone())
        .unwrap_or_else(|e| panic!("example of {method} {path} does not parse: {e}"));
    assert_eq!(
        &serde_json::to_value(parsed).unwrap(),
        ex,
        "{method} {path}: example and type differ"
    );
}

#[test]
fn examples_are_what_the_daemon_takes_and_gives() {
    let doc = doc();
    check_request::<VmSpec>(&doc, "post", "/vms");
    check_request::<MemoryPatch>(&doc, "patch", "/vms/{id}/memory");
    check_request::<HostUpdate>(&doc, "put", "/host/memory");
    check_response::<DaemonInfo>(&doc, "get", "/");
    check_response::<VmList>(&doc, "get", "/vms");
    check_response::<VmInfo>(&doc, "get", "/vms/{id}");
    check_response::<HostMemory>(&doc, "get", "/host/memory");
}

#[test]
fn every_reason_the_policy_gives_is_in_the_document() {
    let doc = doc();
    let reasons: BTreeSet<String> = doc["components"]["schemas"]["Decision"]["properties"]
        ["reason"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    use policy::Reason::*;
    for r in [
        Hold,
        IdleReclaim,
        WorkingSetGrow,
        PressureGrow,
        BudgetSqueeze,
        InProgress,
        BackOff,
        FrozenNoStats,
        FrozenStaleStats,
        AtMin,
        AtMax,
    ] {
        assert!(
            reasons.contains(hostd::control::reason_name(r)),
            "{r:?} missing"
        );
    }
}
