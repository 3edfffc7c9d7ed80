//! Random methods, paths and bodies against a real server and the fake VMM: never a 5xx, every
//! error is a `fault_message`, and the server keeps answering.

mod common;

use api::client::{Client, Reply};
use common::Harness;
use hyper::Method;
use proptest::prelude::*;
use serde_json::{json, Value};

const PATHS: [&str; 11] = [
    "/",
    "/boot-source",
    "/machine-config",
    "/actions",
    "/balloon",
    "/balloon/statistics",
    "/hotplug/memory",
    "/vm/resize",
    "/vm/memory",
    "/metrics",
    "/nope",
];

const FIELDS: [&str; 16] = [
    "kernel_image_path",
    "initrd_path",
    "boot_args",
    "vcpu_count",
    "mem_size_mib",
    "action_type",
    "amount_mib",
    "deflate_on_oom",
    "stats_polling_interval_s",
    "free_page_reporting",
    "total_size_mib",
    "block_size_mib",
    "requested_size_mib",
    "desired_mib",
    "smt",
    "",
];

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::GET),
        4 => Just(Method::PUT),
        3 => Just(Method::PATCH),
        1 => Just(Method::POST),
        1 => Just(Method::DELETE),
        1 => Just(Method::HEAD),
        1 => Just(Method::OPTIONS),
        1 => "[A-Z]{1,8}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(PATHS.to_vec()).prop_map(str::to_owned),
        2 => (prop::sample::select(PATHS.to_vec()), "[a-zA-Z0-9/_.~%=&?-]{0,24}")
            .prop_map(|(p, s)| format!("{p}{s}")),
        2 => ("[a-z_]{0,10}", "[a-z0-9]{0,12}", any::<u64>())
            .prop_map(|(k, v, n)| format!("/vm/memory?{k}={v}&limit={}", n % 5000)),
        1 => "/[a-zA-Z0-9/_.~%-]{0,40}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..5000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        prop::sample::select(vec![
            "InstanceStart",
            "SendCtrlAltDel",
            "FlushMetrics",
            "ballooned"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        2 => Just(None),
        // Objects built from real field names with random values.
        6 => prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()), json_value(), 0..4)
            .prop_map(|m| {
                let obj: serde_json::Map<String, Value> =
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                Some(serde_json::to_vec(&Value::Object(obj)).unwrap())
            }),
        1 => json_value().prop_map(|v| Some(serde_json::to_vec(&v).unwrap())),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Some),
        // Bodies around and beyond the limit.
        1 => (1000usize..40_000).prop_map(|n| Some(format!("{{\"boot_args\": \"{}\"}}", "x".repeat(n)).into_bytes())),
    ]
}

/// A valid body for each route that takes one.
fn template(method: &Method, path: &str) -> Option<Value> {
    let v = match (method.as_str(), path) {
        ("PUT", "/boot-source") => json!({"kernel_image_path": "/k", "boot_args": "console=ttyS0"}),
        ("PUT", "/machine-config") => json!({"vcpu_count": 2, "mem_size_mib": 1024}),
        ("PUT", "/actions") => json!({"action_type": "FlushMetrics"}),
        ("PUT", "/balloon") => {
            json!({"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1})
        }
        ("PATCH", "/balloon") => json!({"amount_mib": 128}),
        ("PATCH", "/balloon/statistics") => json!({"stats_polling_interval_s": 2}),
        ("PUT", "/hotplug/memory") => json!({"total_size_mib": 1024, "block_size_mib": 2}),
        ("PATCH", "/hotplug/memory") => json!({"requested_size_mib": 256}),
        ("PUT", "/vm/resize") => json!({"desired_mib": 1536}),
        _ => return None,
    };
    Some(v)
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    SetField(usize, Value),
    AddField(String, Value),
    DropField(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => Just(Mutation::None),
        4 => (any::<usize>(), json_value()).prop_map(|(i, v)| Mutation::SetField(i, v)),
        1 => (prop::sample::select(FIELDS.to_vec()), json_value()).prop_map(|(k, v)| Mutation::AddField(k.into(), v)),
        1 => any::<usize>().prop_map(Mutation::DropField),
    ]
}

/// A real route with its body, possibly mutated: reaches the VMM's state rules.
fn routed() -> impl Strategy<Value = (Method, String, Option<Vec<u8>>)> {
    (0..api::routes().len(), mutation()).prop_map(|(i, mutation)| {
        let (method, path) = api::routes()[i].clone();
        let body = template(&method, path).map(|mut v| {
            let obj = v.as_object_mut().unwrap();
            let keys: Vec<String> = obj.keys().cloned().collect();
            match mutation {
                Mutation::None => {}
                Mutation::SetField(i, x) => {
                    obj.insert(keys[i % keys.len()].clone(), x);
                }
                Mutation::AddField(k, x) => {
                    obj.insert(k, x);
                }
                Mutation::DropField(i) => {
                    obj.remove(&keys[i % keys.len()]);
                }
            }
            serde_json::to_vec(&v).unwrap()
        });
        (method, path.to_owned(), body)
    })
}

fn request() -> impl Strategy<Value = (Method, String, Option<Vec<u8>>)> {
    prop_oneof![
        3 => routed(),
        2 => (method(), path(), body()),
    ]
}

async fn send(
    c: &mut Client,
    h: &Harness,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Reply {
    match c.raw(method.clone(), path, body.clone()).await {
        Ok(r) => r,
        // The server may close a connection after an error (e.g. 413 with an unread body);
        // a fresh connection must work.
        Err(_) => {
            *c = h.client();
            c.raw(method, path, body)
                .await
                .expect("server answers on a fresh connection")
        }
    }
}

#[test]
fn random_requests_never_get_5xx() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = Harness::start();
    let mut c = h.client();
    // Start half the cases on a running VM: boot it first with a valid sequence.
    rt.block_on(common::boot(&mut c));
    let c = std::cell::RefCell::new(c);
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
    let cfg = ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(cfg, |((m, p, b) in request())| {
        let reply = rt.block_on(send(&mut c.borrow_mut(), &h, m.clone(), &p, b.clone()));
        let status = reply.status.as_u16();
        *seen.borrow_mut().entry(status).or_default() += 1;
        prop_assert!(status < 500, "{m} {p} {:?} -> {status} {:?}", b.as_deref().map(String::from_utf8_lossy).map(|s| s.chars().take(200).collect::<String>()), reply.body);
        if status >= 400 && m != Method::HEAD {
            let fault = reply.fault_message();
            prop_assert!(fault.is_some(), "{m} {p} -> {status} without fault_message: {:?}", reply.body);
        }
    });
    // The generators reach the interesting answers, not only 404s.
    let seen = seen.into_inner();
    eprintln!("statuses seen: {seen:?}");
    for status in [200, 204, 400, 404, 405, 409] {
        assert!(seen.contains_key(&status), "no {status} in {seen:?}");
    }
    // Still alive and consistent.
    let mut c = c.into_inner();
    rt.block_on(async {
        let (s, v) = common::req(&mut c, "GET", "/", None).await;
        assert_eq!(s, 200, "{v}");
        let (s, _) = common::req(&mut c, "GET", "/metrics", None).await;
        assert_eq!(s, 200);
    });
}
