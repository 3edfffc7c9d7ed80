//! `openapi.yaml` is the contract: its operations are exactly the router's, its examples parse
//! into the Rust types, every request schema takes exactly the bodies and queries the server
//! takes (types, ranges, enums, nullability, unknown fields), and the VMM's real answers conform
//! to the response schemas.

mod common;

use std::collections::BTreeSet;

use api::routes::parse_body;
use api::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

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

// ---- The schemas against the server: types, ranges, enums, nullability, unknown fields ----

/// `schema`, or what its `$ref` points to.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let path = r.strip_prefix("#/").expect("local reference");
            path.split('/').fold(doc, |v, k| &v[k])
        }
        None => schema,
    }
}

/// Checks `v` against `schema` with the OpenAPI 3.0 keywords the document uses: type, format
/// int64, minimum, maximum, multipleOf, enum, nullable, minLength, maxLength, required,
/// properties, additionalProperties, items. `closed`: an object may hold only the properties
/// its schema lists (what the server's answers must do; requests say so with
/// `additionalProperties: false`).
fn conforms(doc: &Value, schema: &Value, v: &Value, closed: bool) -> Result<(), String> {
    let s = resolve(doc, schema);
    if v.is_null() {
        return match s["nullable"].as_bool() {
            Some(true) => Ok(()),
            _ => Err("null where the schema is not nullable".into()),
        };
    }
    if let Some(allowed) = s["enum"].as_array() {
        if !allowed.contains(v) {
            return Err(format!("{v} is not one of {allowed:?}"));
        }
    }
    match s["type"].as_str() {
        Some("integer") => {
            let n: i128 = match (v.as_i64(), v.as_u64()) {
                (Some(i), _) => i.into(),
                (None, Some(u)) => u.into(),
                _ => return Err(format!("{v} is not an integer")),
            };
            if s["format"] == "int64" && i64::try_from(n).is_err() {
                return Err(format!("{n} does not fit int64"));
            }
            if s["format"].is_null() && i32::try_from(n).is_err() {
                // OpenAPI's integer without a format: the document gives one when it means more.
                return Err(format!("{n} does not fit the schema's integer"));
            }
            if s["minimum"].as_i64().is_some_and(|m| n < m.into()) {
                return Err(format!("{n} below minimum"));
            }
            if s["maximum"].as_i64().is_some_and(|m| n > m.into()) {
                return Err(format!("{n} above maximum"));
            }
            if s["multipleOf"]
                .as_i64()
                .is_some_and(|m| n % i128::from(m) != 0)
            {
                return Err(format!("{n} not a multiple"));
            }
            Ok(())
        }
        Some("string") => {
            let t = v.as_str().ok_or_else(|| format!("{v} is not a string"))?;
            let chars = t.chars().count() as u64;
            if s["minLength"].as_u64().is_some_and(|m| chars < m) {
                return Err("too short".into());
            }
            if s["maxLength"].as_u64().is_some_and(|m| chars > m) {
                return Err("too long".into());
            }
            Ok(())
        }
        Some("boolean") => v
            .as_bool()
            .map(|_| ())
            .ok_or(format!("{v} is not a boolean")),
        Some("array") => {
            let items = v.as_array().ok_or(format!("{v} is not an array"))?;
            for (i, item) in items.iter().enumerate() {
                conforms(doc, &s["items"], item, closed).map_err(|e| format!("[{i}]: {e}"))?;
            }
            Ok(())
        }
        Some("object") => {
            let obj = v.as_object().ok_or(format!("{v} is not an object"))?;
            for r in s["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    return Err(format!("required {r} is missing"));
                }
            }
            let props = &s["properties"];
            for (k, x) in obj {
                match props.get(k) {
                    Some(p) => conforms(doc, p, x, closed).map_err(|e| format!("{k}: {e}"))?,
                    None => match &s["additionalProperties"] {
                        Value::Bool(false) => return Err(format!("{k} is not a property")),
                        Value::Object(_) => conforms(doc, &s["additionalProperties"], x, closed)
                            .map_err(|e| format!("{k}: {e}"))?,
                        _ if closed => return Err(format!("{k} is not documented")),
                        _ => {}
                    },
                }
            }
            Ok(())
        }
        other => panic!("schema without a type the test knows: {other:?} in {s}"),
    }
}

/// The server's own parsing and validation of a request body (what it does before anything
/// reaches the VMM).
fn server_takes(method: &str, path: &str, body: &[u8]) -> Result<(), String> {
    fn parse<T: DeserializeOwned + Validate>(b: &[u8]) -> Result<(), String> {
        parse_body::<T>(b).map(|_| ()).map_err(|f| f.message)
    }
    match (method, path) {
        ("put", "/boot-source") => parse::<BootSourceConfig>(body),
        ("put", "/machine-config") => parse::<MachineConfig>(body),
        ("put", "/actions") => parse::<ActionRequest>(body),
        ("put", "/balloon") => parse::<BalloonConfig>(body),
        ("patch", "/balloon") => parse::<BalloonUpdate>(body),
        ("patch", "/balloon/statistics") => parse::<BalloonStatsUpdate>(body),
        ("put", "/hotplug/memory") => parse::<HotplugMemoryConfig>(body),
        ("patch", "/hotplug/memory") => parse::<HotplugMemoryUpdate>(body),
        ("put", "/vm/resize") => parse::<ResizeRequest>(body),
        other => panic!("no parser for {other:?}: add it here"),
    }
}

/// Values to try in every field: each type, boundaries of every range the document uses, enum
/// members and near misses.
fn probe_values(schema: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = vec![
        Value::Null,
        json!(true),
        json!(false),
        json!(""),
        json!("x"),
        json!("None"),
        json!("Transparent"),
        json!("2M"),
        json!("T2"),
        json!("InstanceStart"),
        json!("Reboot"),
        json!("/k"),
        json!("a".repeat(2047)),
        json!("a".repeat(2048)),
        json!(1.5),
        json!([]),
        json!({}),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(i64::MIN),
    ];
    for n in [
        -1i64,
        0,
        1,
        2,
        3,
        6,
        15,
        16,
        17,
        64,
        127,
        128,
        129,
        130,
        200,
        254,
        255,
        256,
        300,
        384,
        512,
        1000,
        1024,
        1536,
        2048,
        3600,
        3601,
        4096,
        4097,
        65535,
        65536,
        1_048_576,
        1_048_577,
        2_097_152,
        2_097_153,
        1 << 31,
        1 << 32,
        1 << 40,
        (1 << 40) + 1,
    ] {
        out.push(json!(n));
    }
    for key in ["minimum", "maximum"] {
        if let Some(m) = schema[key].as_i64() {
            out.extend([json!(m - 1), json!(m), json!(m + 1)]);
        }
    }
    out.extend(schema["enum"].as_array().cloned().unwrap_or_default());
    out
}

/// Every request body the document describes, varied one field at a time from its example (and
/// with each field left out, and an unknown field added): the server takes exactly what the
/// schema allows. Rules that tie two fields together are outside a schema's reach; the examples
/// are chosen so that one-field changes never meet them (a 2048 MiB region is a multiple of
/// every block size).
#[test]
fn request_schemas_take_exactly_what_the_server_takes() {
    let doc = doc();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let content = &op["requestBody"]["content"]["application/json"];
            if content.is_null() {
                continue;
            }
            let schema = resolve(&doc, &content["schema"]);
            let base = content["example"].as_object().unwrap().clone();
            let mut cases: Vec<Value> = vec![Value::Object(base.clone())];
            let mut with_extra = base.clone();
            with_extra.insert("not_a_field".into(), json!(1));
            cases.push(Value::Object(with_extra));
            for (field, fs) in schema["properties"].as_object().unwrap() {
                let mut without = base.clone();
                without.remove(field);
                cases.push(Value::Object(without));
                for v in probe_values(resolve(&doc, fs)) {
                    let mut o = base.clone();
                    o.insert(field.clone(), v);
                    cases.push(Value::Object(o));
                }
            }
            for case in cases {
                let schema_says = conforms(&doc, schema, &case, false);
                let server_says = server_takes(method, path, &serde_json::to_vec(&case).unwrap());
                assert_eq!(
                    schema_says.is_ok(),
                    server_says.is_ok(),
                    "{method} {path} {case}: schema {schema_says:?}, server {server_says:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "only {checked} bodies checked");
}

/// The query parameters of `GET /vm/memory`, one at a time: the server takes exactly what the
/// document allows.
#[test]
fn query_parameters_take_exactly_what_the_server_takes() {
    let doc = doc();
    let params = doc["paths"]["/vm/memory"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let mut checked = 0;
    for p in params {
        let name = p["name"].as_str().unwrap();
        let schema = resolve(&doc, &p["schema"]);
        let mut values: Vec<String> = probe_values(schema)
            .iter()
            .filter_map(|v| match v {
                Value::Number(n) => Some(n.to_string()),
                Value::String(s) if s.len() < 100 => Some(s.clone()),
                _ => None,
            })
            .collect();
        values.extend(["ballooned", "unplugged", "discarded", "lost"].map(String::from));
        for raw in values {
            // A query value is text; read as a number where it is one (plain decimal digits).
            let digits = raw.strip_prefix('-').unwrap_or(&raw);
            let number = (!digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()))
                .then(|| {
                    raw.parse::<i64>()
                        .map(Value::from)
                        .or(raw.parse::<u64>().map(Value::from))
                })
                .and_then(Result::ok);
            let as_json = match (schema["type"].as_str(), number) {
                (Some("integer"), Some(n)) => n,
                _ => Value::String(raw.clone()),
            };
            let schema_says = conforms(&doc, schema, &as_json, false);
            let server_says = MemoryQuery::parse(&format!("{name}={raw}"));
            assert_eq!(
                schema_says.is_ok(),
                server_says.is_ok(),
                "GET /vm/memory?{name}={raw}: schema {schema_says:?}, server {server_says:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} queries checked");
}

/// The VMM's real answers, before and after the start and with the devices in use, conform to
/// the documented response schemas, and carry no field the document does not list.
#[tokio::test]
async fn the_vmms_answers_conform_to_the_response_schemas() {
    let doc = doc();
    let h = common::Harness::start();
    let mut c = h.client();
    let check = |path: &str, v: &Value| {
        let route = path.split('?').next().unwrap();
        let schema = &doc["paths"][route]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"];
        assert!(!schema.is_null(), "GET {route} documents no JSON answer");
        if let Err(e) = conforms(&doc, schema, v, true) {
            panic!("GET {path} answered {v}, which the document does not allow: {e}");
        }
    };
    let gets = [
        "/",
        "/balloon",
        "/balloon/statistics",
        "/hotplug/memory",
        "/vm/resize",
    ];
    for (method, path, body) in &common::BOOT_REQUESTS[..4] {
        assert_eq!(common::req(&mut c, method, path, Some(body)).await.0, 204);
    }
    for path in gets {
        check(path, &common::get(&mut c, path).await);
    }
    common::boot(&mut c).await;
    for (method, path, body) in [
        ("PUT", "/vm/resize", r#"{"desired_mib": 2048}"#),
        ("PATCH", "/balloon", r#"{"amount_mib": 64}"#),
    ] {
        assert_eq!(common::req(&mut c, method, path, Some(body)).await.0, 204);
        h.settle();
    }
    let memory = [
        "/vm/memory",
        "/vm/memory?reason=ballooned&limit=3",
        "/vm/memory?reason=unplugged",
        "/vm/memory?reason=discarded&pfn_start=1048576",
    ];
    for path in gets.iter().chain(&memory) {
        check(path, &common::get(&mut c, path).await);
    }
}
