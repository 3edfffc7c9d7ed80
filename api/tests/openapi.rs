//! `openapi.yaml` is the contract: its operations are exactly the router's, and its examples parse
//! into the Rust types (request examples with `deny_unknown_fields` and validation).

use std::collections::BTreeSet;

use api::routes::parse_body;
use api::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn doc() -> Value {
    serde_yaml_ng::from_str(api::OPENAPI_YAML).expect("openapi.yaml is valid YAML")
}

const METHODS: [&str; 8] = [
    "get", "put", "patch", "post", "delete", "head", "options", "trace",
];

#[test]
fn document_and_router_have_the_same_operations() {
    let doc = doc();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut in_doc = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            assert!(
                METHODS.contains(&method.as_str()),
                "{path}: unexpected key {method}"
            );
            in_doc.insert((method.to_uppercase(), path.clone()));
        }
    }
    let in_router: BTreeSet<_> = api::routes()
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing_from_doc: Vec<_> = in_router.difference(&in_doc).collect();
    let missing_from_router: Vec<_> = in_doc.difference(&in_router).collect();
    assert!(
        missing_from_doc.is_empty(),
        "routes not in openapi.yaml: {missing_from_doc:?}"
    );
    assert!(
        missing_from_router.is_empty(),
        "operations not in the router: {missing_from_router:?}"
    );
}

fn request_example(doc: &Value, method: &str, path: &str) -> Vec<u8> {
    let ex = &doc["paths"][path][method]["requestBody"]["content"]["application/json"]["example"];
    assert!(!ex.is_null(), "{method} {path} has no request example");
    serde_json::to_vec(ex).unwrap()
}

fn response_example(doc: &Value, method: &str, path: &str) -> Value {
    let ex =
        &doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["example"];
    assert!(!ex.is_null(), "{method} {path} has no 200 example");
    ex.clone()
}

fn check_request<T: DeserializeOwned + Validate>(doc: &Value, method: &str, path: &str) {
    let body = request_example(doc, method, path);
    if let Err(f) = parse_body::<T>(&body) {
        panic!("example of {method} {path} is rejected: {}", f.message);
    }
}

/// Parses a response example and checks it round-trips: every field in the example is a field of
/// the type and every field of the type is in the example.
fn check_response<T: DeserializeOwned + Serialize>(doc: &Value, method: &str, path: &str) {
    let ex = response_example(doc, method, path);
    let parsed: T = serde_json::from_value(ex.clone())
        .unwrap_or_else(|e| panic!("example of {method} {path} does not parse: {e}"));
    assert_eq!(
        serde_json::to_value(parsed).unwrap(),
        ex,
        "{method} {path}: example and type differ"
    );
}

/// The schema's properties are the type's fields (checked against the full example).
fn check_schema_matches_example(
    doc: &Value,
    schema: &str,
    method: &str,
    path: &str,
    response: bool,
) {
    let props: BTreeSet<String> = doc["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {schema}"))
        .keys()
        .cloned()
        .collect();
    let ex = if response {
        response_example(doc, method, path)
    } else {
        serde_json::from_slice(&request_example(doc, method, path)).unwrap()
    };
    let keys: BTreeSet<String> = ex.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        props, keys,
        "schema {schema} and the example of {method} {path} list different fields"
    );
}

#[test]
fn request_examples_parse_and_validate() {
    let doc = doc();
    check_request::<BootSourceConfig>(&doc, "put", "/boot-source");
    check_request::<MachineConfig>(&doc, "put", "/machine-config");
    check_request::<ActionRequest>(&doc, "put", "/actions");
    check_request::<BalloonConfig>(&doc, "put", "/balloon");
    check_request::<BalloonUpdate>(&doc, "patch", "/balloon");
    check_request::<BalloonStatsUpdate>(&doc, "patch", "/balloon/statistics");
    check_request::<HotplugMemoryConfig>(&doc, "put", "/hotplug/memory");
    check_request::<HotplugMemoryUpdate>(&doc, "patch", "/hotplug/memory");
    check_request::<ResizeRequest>(&doc, "put", "/vm/resize");
    for (schema, method, path) in [
        ("BootSource", "put", "/boot-source"),
        ("MachineConfig", "put", "/machine-config"),
        ("Action", "put", "/actions"),
        ("BalloonConfig", "put", "/balloon"),
        ("BalloonUpdate", "patch", "/balloon"),
        ("BalloonStatsUpdate", "patch", "/balloon/statistics"),
        ("HotplugMemoryConfig", "put", "/hotplug/memory"),
        ("HotplugMemoryUpdate", "patch", "/hotplug/memory"),
        ("ResizeRequest", "put", "/vm/resize"),
    ] {
        check_schema_matches_example(&doc, schema, method, path, false);
    }
}

#[test]
fn response_examples_parse() {
    let doc = doc();
    check_response::<InstanceInfo>(&doc, "get", "/");
    check_response::<BalloonState>(&doc, "get", "/balloon");
    check_response::<BalloonStats>(&doc, "get", "/balloon/statistics");
    check_response::<HotplugMemoryState>(&doc, "get", "/hotplug/memory");
    check_response::<ResizeStatus>(&doc, "get", "/vm/resize");
    check_response::<MemoryMap>(&doc, "get", "/vm/memory");
    for (schema, method, path) in [
        ("InstanceInfo", "get", "/"),
        ("BalloonState", "get", "/balloon"),
        ("BalloonStats", "get", "/balloon/statistics"),
        ("HotplugMemoryState", "get", "/hotplug/memory"),
        ("ResizeStatus", "get", "/vm/resize"),
        ("MemoryMap", "get", "/vm/memory"),
    ] {
        check_schema_matches_example(&doc, schema, method, path, true);
    }
    let fault = &doc["components"]["responses"]["Fault"]["content"]["application/json"]["example"];
    let f: FaultBody = serde_json::from_value(fault.clone()).unwrap();
    assert!(f.fault_message.contains("mem_size_mib"));
}

#[test]
fn memory_query_parameters_are_the_query_type() {
    let doc = doc();
    let params: BTreeSet<String> = doc["paths"]["/vm/memory"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    let q = MemoryQuery {
        reason: Some(OfflineReason::Ballooned),
        pfn_end: Some(1),
        ..Default::default()
    };
    let fields: BTreeSet<String> = serde_json::to_value(q)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(params, fields);
    // Enum spellings agree.
    let reasons: Vec<String> = doc["components"]["schemas"]["OfflineReason"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let ours: Vec<String> = OfflineReason::ALL.iter().map(|r| r.to_string()).collect();
    assert_eq!(reasons, ours);
}

#[test]
fn every_operation_documents_errors() {
    let doc = doc();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["responses"]["default"].is_object(),
                "{method} {path} lacks the Fault response"
            );
            assert!(
                op["operationId"].is_string(),
                "{method} {path} lacks an operationId"
            );
        }
    }
}
