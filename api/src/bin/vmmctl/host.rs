//! `vmmctl vms ...` and `vmmctl host ...`: the host daemon's commands (hostd/README.md). Here
//! `--socket` names the daemon's socket (STATE_DIR/hostd.sock). The daemon's answers are shown
//! from their JSON (the api crate does not depend on hostd), with the same `--json`, `--wait`
//! and exit status conventions as the VMM commands.

use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use super::{print_json, Failure, WaitArgs, Waiter};
use api::client::{Client, ClientError};

#[derive(Subcommand, Debug)]
pub enum VmsCmd {
    /// Every VM the daemon runs (GET /vms).
    List,
    /// One VM: state, PID, sockets, memory, last decision, how it ended (GET /vms/ID).
    Get { id: String },
    /// Create and start a VM (POST /vms); `--wait` until its VMM answers.
    Create {
        #[arg(long)]
        id: String,
        /// Guest kernel, an absolute path on the daemon's host.
        #[arg(long)]
        kernel: String,
        #[arg(long)]
        initramfs: Option<String>,
        #[arg(long)]
        cmdline: Option<String>,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Boot RAM, MiB.
        #[arg(long)]
        boot_mib: u64,
        /// Guaranteed minimum, MiB [default: boot].
        #[arg(long)]
        min_mib: Option<u64>,
        /// Maximum, MiB [default: boot].
        #[arg(long)]
        max_mib: Option<u64>,
        /// Share when memory is short [default: 100].
        #[arg(long)]
        weight: Option<u32>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop and remove a VM (DELETE /vms/ID); `--wait` until it is gone.
    Delete {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change a VM's limits at run time (PATCH /vms/ID/memory).
    Memory {
        id: String,
        #[arg(long)]
        min_mib: Option<u64>,
        #[arg(long)]
        max_mib: Option<u64>,
        #[arg(long)]
        weight: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// The budget, guarantees, and every VM's target, size, RSS and last decision.
    Memory,
    /// Set the budget, the tick or policy parameters (PUT /host/memory).
    Set {
        #[arg(long)]
        budget_mib: Option<u64>,
        #[arg(long)]
        tick_ms: Option<u64>,
        /// A policy parameter, `NAME=VALUE` (repeatable), e.g. `--param buffer_pct=25`.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
    },
}

fn opt<T: serde::Serialize>(v: Option<T>) -> Value {
    v.map_or(Value::Null, |v| json!(v))
}

/// Drops null fields, so absent options are absent from the body.
fn compact(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.retain(|_, x| !x.is_null());
        for x in m.values_mut() {
            *x = compact(x.take());
        }
    }
    v
}

async fn send(c: &mut Client, method: Method, path: &str, body: Value) -> Result<Value, Failure> {
    let bytes = serde_json::to_vec(&body).expect("JSON values serialize");
    let reply = c.call(method, path, Some(bytes)).await?;
    Ok(serde_json::from_slice(&reply.body).unwrap_or(Value::Null))
}

pub async fn vms(c: &mut Client, cmd: VmsCmd, as_json: bool) -> Result<(), Failure> {
    match cmd {
        VmsCmd::List => {
            let v: Value = c.get("/vms").await?;
            if as_json {
                print_json(&v);
            } else {
                print!("{}", vm_table(v["vms"].as_array().map_or(&[][..], |a| a)));
            }
        }
        VmsCmd::Get { id } => {
            let v: Value = c.get(&format!("/vms/{id}")).await?;
            print_json(&v);
        }
        VmsCmd::Create {
            id,
            kernel,
            initramfs,
            cmdline,
            vcpus,
            boot_mib,
            min_mib,
            max_mib,
            weight,
            wait,
        } => {
            let body = compact(json!({
                "id": id, "kernel": kernel, "initramfs": opt(initramfs), "cmdline": opt(cmdline),
                "vcpus": vcpus,
                "memory": { "boot_mib": boot_mib, "min_mib": opt(min_mib),
                            "max_mib": opt(max_mib), "weight": opt(weight) },
            }));
            let v = send(c, Method::POST, "/vms", body).await?;
            if wait.wait {
                wait_state(c, &id, wait, |v| v["state"] != "starting").await?;
            }
            if as_json {
                print_json(&v);
            } else {
                println!("vm {id} created (pid {})", v["pid"]);
            }
        }
        VmsCmd::Delete { id, wait } => {
            let v = send(c, Method::DELETE, &format!("/vms/{id}"), Value::Null).await?;
            if wait.wait && v["state"] != "exited" {
                wait_gone(c, &id, wait).await?;
                println!("vm {id} stopped and removed");
            } else if v["state"] == "exited" {
                println!("vm {id} removed (it had ended: {})", v["exit"]["cause"]);
            } else {
                println!("vm {id} stopping");
            }
        }
        VmsCmd::Memory {
            id,
            min_mib,
            max_mib,
            weight,
        } => {
            let body = compact(json!({
                "min_mib": opt(min_mib), "max_mib": opt(max_mib), "weight": opt(weight),
            }));
            let v = send(c, Method::PATCH, &format!("/vms/{id}/memory"), body).await?;
            if as_json {
                print_json(&v);
            } else {
                let m = &v["memory"];
                println!(
                    "vm {id}: min {} MiB, max {} MiB, weight {}",
                    m["min_mib"], m["max_mib"], m["weight"]
                );
            }
        }
    }
    Ok(())
}

pub async fn host(c: &mut Client, cmd: HostCmd, as_json: bool) -> Result<(), Failure> {
    let v = match cmd {
        HostCmd::Memory => c.get::<Value>("/host/memory").await?,
        HostCmd::Set {
            budget_mib,
            tick_ms,
            params,
        } => {
            let mut p = serde_json::Map::new();
            for kv in params {
                let (k, val) = kv
                    .split_once('=')
                    .ok_or_else(|| Failure::Usage(format!("--param {kv}: expected NAME=VALUE")))?;
                let val: Value = serde_json::from_str(val)
                    .map_err(|_| Failure::Usage(format!("--param {kv}: VALUE is not a number")))?;
                p.insert(k.to_string(), val);
            }
            let params = if p.is_empty() {
                Value::Null
            } else {
                Value::Object(p)
            };
            let body = compact(json!({
                "budget_mib": opt(budget_mib), "tick_ms": opt(tick_ms), "params": params,
            }));
            send(c, Method::PUT, "/host/memory", body).await?
        }
    };
    if as_json {
        print_json(&v);
    } else {
        print!("{}", host_table(&v));
    }
    Ok(())
}

/// Polls `GET /vms/ID` until `done`, printing each change of state.
async fn wait_state(
    c: &mut Client,
    id: &str,
    wait: WaitArgs,
    done: impl Fn(&Value) -> bool,
) -> Result<(), Failure> {
    let waiter = Waiter::new(wait)?;
    let mut shown = String::new();
    loop {
        let v: Value = c.get(&format!("/vms/{id}")).await?;
        let state = v["state"].as_str().unwrap_or("?").to_string();
        if state != shown {
            eprintln!("vm {id}: {state}");
            shown = state;
        }
        if v["state"] == "exited" {
            return Err(Failure::Api(ClientError::Request(format!(
                "vm {id} ended: {}",
                v["exit"]["cause"]
            ))));
        }
        if done(&v) {
            return Ok(());
        }
        waiter.not_yet(|| format!("vm {id} is {shown}")).await?;
    }
}

/// Polls until `GET /vms/ID` answers 404.
async fn wait_gone(c: &mut Client, id: &str, wait: WaitArgs) -> Result<(), Failure> {
    let waiter = Waiter::new(wait)?;
    eprintln!("vm {id}: stopping");
    loop {
        match c.get::<Value>(&format!("/vms/{id}")).await {
            Err(ClientError::Status { status, .. }) if status == hyper::StatusCode::NOT_FOUND => {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
            Ok(_) => {
                waiter
                    .not_yet(|| format!("vm {id} is still stopping"))
                    .await?
            }
        }
    }
}

fn mib(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |n| n.to_string())
}

/// `vms list`: one line per VM.
fn vm_table(vms: &[Value]) -> String {
    let mut out = format!(
        "{:<16} {:<9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}  {}\n",
        "ID", "STATE", "PID", "MIN", "MAX", "TARGET", "ACTUAL", "RSS", "LAST DECISION / EXIT"
    );
    for v in vms {
        let m = &v["memory"];
        let last = if v["state"] == "exited" {
            v["exit"]["cause"].as_str().unwrap_or("").to_string()
        } else {
            v["last_decision"]["reason"]
                .as_str()
                .unwrap_or("-")
                .to_string()
        };
        out.push_str(&format!(
            "{:<16} {:<9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}  {last}\n",
            v["id"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            mib(&v["pid"]),
            mib(&m["min_mib"]),
            mib(&m["max_mib"]),
            mib(&m["target_mib"]),
            mib(&m["current_mib"]),
            mib(&m["rss_mib"]),
        ));
    }
    out
}

/// `host memory`: the budget line, then one line per live VM.
fn host_table(v: &Value) -> String {
    let t = &v["last_tick"];
    let mut out =
        format!(
        "budget {} MiB, guaranteed {} MiB, targets {} MiB, VMM RSS {} MiB; host available {} MiB, \
         PSI some {}%; tick {} ms\n",
        mib(&v["budget_mib"]),
        mib(&v["guaranteed_mib"]),
        mib(&t["total_target_mib"]),
        mib(&v["total_rss_mib"]),
        mib(&t["host"]["mem_available_mib"]),
        t["host"]["psi_some_avg10"].as_f64().map_or("-".into(), |p| format!("{p:.2}")),
        mib(&v["tick_ms"]),
    );
    out.push_str(&format!(
        "{:<16} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>9}  {}\n",
        "ID", "MIN", "MAX", "WEIGHT", "TARGET", "ACTUAL", "RSS", "AVAIL", "LAST DECISION"
    ));
    for vm in v["vms"].as_array().map_or(&[][..], |a| a) {
        let d = &vm["last_decision"];
        out.push_str(&format!(
            "{:<16} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>9}  {}\n",
            vm["id"].as_str().unwrap_or("?"),
            mib(&vm["limits"]["min_mib"]),
            mib(&vm["limits"]["max_mib"]),
            mib(&vm["limits"]["weight"]),
            mib(&vm["target_mib"]),
            mib(&vm["current_mib"]),
            mib(&vm["rss_mib"]),
            mib(&vm["available_mib"]),
            d["reason"].as_str().unwrap_or("-"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_options_are_left_out_of_the_body() {
        let v = compact(json!({"a": 1, "b": null, "m": {"x": null, "y": 2}}));
        assert_eq!(v, json!({"a": 1, "m": {"y": 2}}));
    }

    #[test]
    fn tables_show_the_ended_cause_and_the_decision() {
        let vms = [
            json!({"id": "a", "state": "running", "pid": 7,
                   "memory": {"min_mib": 256, "max_mib": 1024, "target_mib": 300,
                              "current_mib": 300, "rss_mib": 180},
                   "last_decision": {"reason": "idle_reclaim"}, "exit": null}),
            json!({"id": "b", "state": "exited", "pid": 8, "memory": {"min_mib": 256},
                   "last_decision": null,
                   "exit": {"cause": "the VMM was killed by signal 9 (SIGKILL)"}}),
        ];
        let t = vm_table(&vms);
        assert!(t.contains("idle_reclaim"), "{t}");
        assert!(
            t.contains("exited") && t.contains("killed by signal 9"),
            "{t}"
        );
        assert!(
            t.lines().nth(2).unwrap().contains("      -  "),
            "unknown sizes show -: {t}"
        );
    }
}
