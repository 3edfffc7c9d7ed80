//! Replays every `$ curl` example of README.md, in order, against the VMM's real handler and
//! devices (no KVM), and checks that the line after it is exactly what curl would print
//! (`-w ' HTTP %{http_code}\n'`). Before each GET the simulated guest does what the devices ask
//! (as a guest has, by the time a person types the next command). The instance id holds the
//! VMM's process id; the README shows it as `vmm-4242`.

mod common;

use common::{raw, Harness};

/// Splits a shell command line on spaces, honouring single quotes (all the README uses).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    let mut has_word = false;
    for ch in line.chars() {
        match ch {
            '\'' => {
                in_quote = !in_quote;
                has_word = true;
            }
            ' ' if !in_quote => {
                if has_word {
                    words.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            c => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    assert!(!in_quote, "unbalanced quote in {line}");
    if has_word {
        words.push(cur);
    }
    words
}

struct Example {
    command: String,
    method: String,
    path: String,
    body: Option<String>,
    expected: String,
}

fn examples() -> Vec<Example> {
    let readme = include_str!("../README.md");
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(cmd) = line.strip_prefix("$ curl ") else {
            continue;
        };
        let words = shell_words(cmd);
        let mut method = "GET".to_owned();
        let mut url = None;
        let mut body = None;
        let mut it = words.iter();
        while let Some(w) = it.next() {
            match w.as_str() {
                "-s" => {}
                "--unix-socket" => assert_eq!(it.next().unwrap(), "/tmp/vmm.sock"),
                "-w" => assert_eq!(it.next().unwrap(), r" HTTP %{http_code}\n"),
                "-X" => method = it.next().unwrap().clone(),
                "-d" => body = Some(it.next().unwrap().clone()),
                u if u.starts_with("http://localhost") => url = Some(u.to_owned()),
                other => panic!("README line {}: unexpected curl argument {other}", i + 1),
            }
        }
        let url = url.expect("a URL");
        // curl -d without -X sends POST; the README always names the method with a body.
        assert!(
            body.is_none() || method != "GET",
            "line {}: body without -X",
            i + 1
        );
        out.push(Example {
            command: cmd.to_owned(),
            method,
            path: url["http://localhost".len()..].to_owned(),
            body,
            expected: lines[i + 1].to_owned(),
        });
    }
    out
}

#[tokio::test]
async fn readme_curl_examples_are_real() {
    let examples = examples();
    assert!(
        examples.len() >= 10,
        "found only {} examples",
        examples.len()
    );
    let h = Harness::start();
    let mut c = h.client();
    let id = format!("\"id\":\"vmm-{}\"", std::process::id());
    for ex in examples {
        if ex.method == "GET" {
            h.settle();
        }
        let reply = raw(&mut c, &ex.method, &ex.path, ex.body.as_deref()).await;
        let got = format!(
            "{} HTTP {}",
            String::from_utf8_lossy(&reply.body),
            reply.status.as_u16()
        )
        .replace(&id, "\"id\":\"vmm-4242\"");
        if std::env::var_os("README_PRINT").is_some() {
            println!("$ curl {}\n{got}", ex.command);
            continue;
        }
        assert_eq!(got, ex.expected, "{} {} {:?}", ex.method, ex.path, ex.body);
    }
}
