//! The deployment files of `deploy/` and the local cluster script, checked for real: every NATS
//! configuration passes `nats-server -t` (the TLS ones with a throwaway CA), every YAML file
//! parses and says what its readers rely on, and `deploy/local/cluster.sh` brings up three
//! routed servers and three nodes that apply purges and a Python publisher's batch, survive the
//! loss of a server, enforce the NATS permissions, and leave nothing running after `down`.
//!
//! It lives in the node's package so that cargo builds the `invalbus-node` binary for it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

const NODE_BIN: &str = env!("CARGO_BIN_EXE_invalbus-node");

/// Generous: the suite runs on a shared 2-core machine.
const DEADLINE: Duration = Duration::from_secs(90);

const PASSWORDS: [(&str, &str); 5] = [
    ("INVALBUS_SERVICE_PASSWORD", "ptest1"),
    ("INVALBUS_NODE_PASSWORD", "ptest2"),
    ("INVALBUS_PUBLISHER_PASSWORD", "ptest3"),
    ("INVALBUS_ADMIN_PASSWORD", "ptest4"),
    ("INVALBUS_SYS_PASSWORD", "ptest5"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the node crate is in the workspace")
        .to_path_buf()
}

/// `$NATS_SERVER_BIN`, else `nats-server` on PATH, else Debian's `/usr/sbin/nats-server`.
fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|b| !b.is_empty()) {
        return bin.into();
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| "/usr/sbin/nats-server".into())
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A tool a check needs: present, or skipped with a message outside CI (in CI: a failure).
fn require(tool: &str, arg: &str, what: &str) -> bool {
    if have(tool, arg) {
        return true;
    }
    assert!(!in_ci(), "{tool} is missing and CI is set: it is needed for {what}");
    eprintln!("SKIPPED {what}: {tool} not found");
    false
}

/// Whether `python` can import the `invalbus` package with nats-py (required in CI).
fn require_python(python: &str, what: &str) -> bool {
    let ok = Command::new(python)
        .args(["-c", "import invalbus.publisher, nats"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !in_ci(),
            "{python} cannot import invalbus and nats (run scripts/test, or set INVALBUS_PYTHON) and CI is set: it is needed for {what}"
        );
        eprintln!("SKIPPED {what}: {python} cannot import invalbus and nats (set INVALBUS_PYTHON)");
    }
    ok
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn nats_t(conf: &Path) -> Output {
    Command::new(nats_server_bin())
        .args(["-t", "-c"])
        .arg(conf)
        .envs(PASSWORDS)
        .output()
        .expect("run nats-server -t")
}

fn files(dir: &Path, ext: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(files(&path, ext));
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ext.contains(&e))
        {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn every_nats_config_passes_nats_server_t() {
    let nats = repo().join("deploy/nats");
    let plain: Vec<PathBuf> = std::fs::read_dir(&nats)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    assert!(plain.len() >= 4, "expected accounts.conf and three servers: {plain:?}");
    for conf in &plain {
        let o = nats_t(conf);
        assert!(o.status.success(), "{}: {}", conf.display(), text(&o));
    }

    // The check can fail: a missing password is refused.
    let o = Command::new(nats_server_bin())
        .args(["-t", "-c"])
        .arg(nats.join("nats-1.conf"))
        .envs(PASSWORDS)
        .env_remove("INVALBUS_NODE_PASSWORD")
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "nats-server -t accepted an unset password variable"
    );

    // The accounts in the Helm values are the same file as deploy/nats/accounts.conf.
    let values: Yaml =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo().join("deploy/k8s/nats-values.yaml")).unwrap())
            .expect("nats-values.yaml parses");
    let helm_accounts = values["configMap"]["merge"]["data"]["accounts.conf"]
        .as_str()
        .expect("nats-values.yaml: configMap.merge.data.accounts.conf");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("accounts.conf"), helm_accounts).unwrap();
    let wrapper = tmp.path().join("server.conf");
    std::fs::write(
        &wrapper,
        "listen: 127.0.0.1:-1\njetstream {}\ninclude ./accounts.conf\n",
    )
    .unwrap();
    let o = nats_t(&wrapper);
    assert!(o.status.success(), "the accounts of nats-values.yaml: {}", text(&o));
    let subjects = |s: &str| -> BTreeSet<String> { s.split('"').skip(1).step_by(2).map(str::to_owned).collect() };
    let file_accounts = std::fs::read_to_string(nats.join("accounts.conf")).unwrap();
    assert_eq!(
        subjects(helm_accounts),
        subjects(&file_accounts),
        "nats-values.yaml and deploy/nats/accounts.conf grant different subjects"
    );

    // TLS variants, with a throwaway CA and a certificate for nats-1..3.
    if !require("openssl", "version", "the TLS configurations") {
        return;
    }
    let certs = tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let run = |args: &[&str]| {
        let o = Command::new("openssl").args(args).current_dir(&certs).output().unwrap();
        assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &["-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=nats"],
    ]
    .concat());
    std::fs::write(
        certs.join("ext.cnf"),
        "subjectAltName=DNS:nats-1,DNS:nats-2,DNS:nats-3\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    // The files name /etc/nats/tls; point them at the throwaway certificates, keeping the
    // layout (tls/ next to accounts.conf) for their include.
    std::fs::copy(nats.join("accounts.conf"), tmp.path().join("accounts.conf")).unwrap();
    std::fs::create_dir(tmp.path().join("tls")).unwrap();
    let tls = files(&nats.join("tls"), &["conf"]);
    assert_eq!(tls.len(), 3, "three TLS server configs: {tls:?}");
    for conf in tls {
        let original = std::fs::read_to_string(&conf).unwrap();
        assert!(original.contains("/etc/nats/tls/ca.pem"), "{}", conf.display());
        let copy = tmp.path().join("tls").join(conf.file_name().unwrap());
        std::fs::write(&copy, original.replace("/etc/nats/tls", certs.to_str().unwrap())).unwrap();
        let o = nats_t(&copy);
        assert!(o.status.success(), "{}: {}", conf.display(), text(&o));
    }
}

/// Every document of a YAML file.
fn yaml_documents(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn every_yaml_file_parses_and_says_what_it_should() {
    let all = files(&repo().join("deploy"), &["yml", "yaml"]);
    assert!(all.len() >= 5, "YAML files of deploy/: {all:?}");
    for path in &all {
        assert!(!yaml_documents(path).is_empty(), "{} is empty", path.display());
    }

    // Kubernetes manifests: every object is complete; the node has gRPC probes and a budget.
    let mut kinds = Vec::new();
    for name in ["secrets.yaml", "invalbus-node.yaml", "sidecar-example.yaml"] {
        for doc in yaml_documents(&repo().join("deploy/k8s").join(name)) {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: an object without kind"));
            assert!(doc["apiVersion"].is_string(), "{name}: {kind} without apiVersion");
            assert!(doc["metadata"]["name"].is_string(), "{name}: {kind} without a name");
            if kind == "Deployment" {
                let pod = &doc["spec"]["template"]["spec"];
                let node = pod["containers"]
                    .as_sequence()
                    .into_iter()
                    .chain(pod["initContainers"].as_sequence())
                    .flatten()
                    .find(|c| c["image"].as_str().is_some_and(|i| i.starts_with("invalbus-node")))
                    .unwrap_or_else(|| panic!("{name}: no invalbus-node container"));
                assert_eq!(node["livenessProbe"]["grpc"]["port"].as_u64(), Some(7700), "{name}");
                assert_eq!(
                    doc["spec"]["selector"]["matchLabels"], doc["spec"]["template"]["metadata"]["labels"],
                    "{name}: the selector must match the pod labels"
                );
                if name == "invalbus-node.yaml" {
                    assert_eq!(node["readinessProbe"]["grpc"]["port"].as_u64(), Some(7700));
                }
            }
            kinds.push(kind.to_owned());
        }
    }
    for kind in ["Secret", "Deployment", "Service", "PodDisruptionBudget"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in deploy/k8s: {kinds:?}");
    }

    let values = &yaml_documents(&repo().join("deploy/k8s/nats-values.yaml"))[0];
    assert_eq!(values["config"]["cluster"]["replicas"].as_u64(), Some(3));
    assert_eq!(values["config"]["jetstream"]["enabled"].as_bool(), Some(true));
    assert!(values["config"]["jetstream"]["fileStore"]["pvc"]["size"].is_string());
    assert!(values["podTemplate"]["topologySpreadConstraints"].is_mapping());

    // Compose: the whole topology, and every NATS config it names exists.
    let compose = &yaml_documents(&repo().join("deploy/docker-compose.yml"))[0];
    let services = compose["services"].as_mapping().expect("services");
    for s in [
        "nats-1", "nats-2", "nats-3", "node-1", "node-2", "node-3", "postgres", "blog-1", "blog-2",
    ] {
        assert!(services.contains_key(s), "docker-compose.yml: no service {s}");
    }
    for i in 1..=3 {
        let command = &compose["services"][format!("nats-{i}").as_str()]["command"];
        let conf = command[1].as_str().expect("nats command: -c FILE");
        let local = repo().join("deploy/nats").join(conf.trim_start_matches("/etc/nats/"));
        assert!(
            local.is_file(),
            "docker-compose.yml names {conf}, which deploy/nats lacks"
        );
    }
}

/// Runs the local cluster script.
fn cluster(dir: &Path, base: u16, command: &str) -> Output {
    Command::new("bash")
        .arg(repo().join("deploy/local/cluster.sh"))
        .arg(command)
        .env("INVALBUS_LOCAL_DIR", dir)
        .env("INVALBUS_LOCAL_BASE_PORT", base.to_string())
        .env("INVALBUS_NODE_BIN", NODE_BIN)
        .env("NATS_SERVER_BIN", nats_server_bin())
        .output()
        .expect("run deploy/local/cluster.sh")
}

/// Stops the cluster however the test ends.
struct Down<'a>(&'a Path, u16);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = cluster(self.0, self.1, "down");
    }
}

/// A base port whose 50 ports above are free (below the kernel's ephemeral range, so other
/// tests' port-0 binds cannot take them meanwhile).
fn free_base() -> u16 {
    for _ in 0..50 {
        let base = 20_000 + 100 * rand::random_range(0..100u16);
        let free = (1..50).all(|p| std::net::TcpListener::bind(("127.0.0.1", base + p)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free port range found");
}

/// Whether the process exists and is not a zombie.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn env_file(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("env.sh"))
        .expect("env.sh")
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn node_cli(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(NODE_BIN)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run invalbus-node")
}

/// Purges `tag` through the CLI with `--wait` until every node's receipt is in the answer.
///
/// A purge can be answered without a receipt that was written: the origin listens for receipts
/// on a core NATS subscription, and in a cluster the other servers learn of it a moment later,
/// so a fast node's receipt can go by unheard (it is in the audit stream all the same). Hence
/// a short wait and another purge.
fn purge_reaches_every_node(env: &[(String, String)], tag: &str) -> Result<(), String> {
    let until = Instant::now() + DEADLINE;
    let want: BTreeSet<String> = ["node-1", "node-2", "node-3"].map(String::from).into();
    let mut last = String::new();
    while Instant::now() < until {
        let o = node_cli(
            env,
            &[
                "purge",
                "--tag",
                tag,
                "--reason",
                "deploy test",
                "--wait",
                "--wait-timeout-ms",
                "15000",
                "--json",
            ],
        );
        if o.status.success() {
            let r: Json = serde_json::from_slice(&o.stdout).expect("purge --json");
            let nodes: BTreeSet<String> = r["receipts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x["node"].as_str().map(str::to_owned))
                .collect();
            if nodes == want {
                return Ok(());
            }
            last = format!("receipts from {nodes:?}: {}", text(&o));
            eprintln!(
                "purge of {tag} at {:?}: {}",
                Instant::now() + DEADLINE - until,
                last.lines().next().unwrap_or_default()
            );
        } else {
            last = text(&o);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

#[test]
fn local_cluster_applies_purges_survives_a_lost_server_and_stops_cleanly() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("cluster");
    let base = free_base();
    let down = Down(&dir, base);

    let started = Instant::now();
    let up = cluster(&dir, base, "up");
    assert!(up.status.success(), "cluster.sh up: {}", text(&up));
    assert!(String::from_utf8_lossy(&up.stdout).contains("is up"), "{}", text(&up));
    eprintln!("cluster up in {:?}", started.elapsed());
    let pids: Vec<(String, u32)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pid"))
        .map(|p| {
            let pid = std::fs::read_to_string(&p).unwrap().trim().parse().unwrap();
            (p.file_stem().unwrap().to_string_lossy().into_owned(), pid)
        })
        .collect();
    assert_eq!(pids.len(), 6, "three servers and three nodes: {pids:?}");
    assert!(pids.iter().all(|(_, pid)| running(*pid)));
    let status = cluster(&dir, base, "status");
    assert!(status.status.success(), "status: {}", text(&status));

    let env = env_file(&dir);
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
    purge_reaches_every_node(&env, "author:42").unwrap_or_else(|e| panic!("first purge: {e}"));
    eprintln!("first purge applied by every node at {:?}", started.elapsed());

    // The publisher needs the `invalbus` package with nats-py: scripts/test makes a virtualenv
    // with them and names its python in INVALBUS_PYTHON.
    let python = std::env::var("INVALBUS_PYTHON").unwrap_or_else(|_| "python3".into());
    if require_python(&python, "the Python publisher against the cluster") {
        // publish.py as the `publisher` user: every node applies its batch (their receipts are
        // in the audit log).
        let script = repo().join("examples/python/publish.py");
        let o = Command::new(&python)
            .arg(&script)
            .args(["--nats", &get("INVALBUS_NATS_PUBLISHER_URL"), "--namespace", "blog"])
            .args([
                "--tag",
                "author:7",
                "--origin",
                "py-deploy-test",
                "--reason",
                "from python",
                "--ack",
                "--key-file",
                &get("INVALBUS_PUBLISHER_KEY_FILE"),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "publish.py: {}", text(&o));
        let until = Instant::now() + DEADLINE;
        let mut last = String::new();
        let applied = loop {
            let o = node_cli(&env, &["audit", "--origin", "py-deploy-test", "--json"]);
            if o.status.success() {
                let r: Json = serde_json::from_slice(&o.stdout).expect("audit --json");
                let nodes: BTreeSet<&str> = r["records"][0]["receipts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x["node"].as_str())
                    .collect();
                if nodes.len() == 3 && r["records"][0]["invalidations"][0]["reason"] == "from python" {
                    break true;
                }
            }
            last = text(&o);
            if Instant::now() > until {
                break false;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        assert!(
            applied,
            "the Python batch never showed three receipts in the audit log: {last}"
        );

        // The namespace trusts listed keys only: the same publisher with a key of its own
        // reaches the servers, and every node refuses its batch.
        let before: Vec<u64> = (1..=3).map(|i| refused_untrusted(&env, i)).collect();
        let o = Command::new(&python)
            .arg(&script)
            .args(["--nats", &get("INVALBUS_NATS_PUBLISHER_URL"), "--namespace", "blog"])
            .args(["--tag", "author:7", "--origin", "py-stranger", "--ack"])
            .output()
            .unwrap();
        assert!(o.status.success(), "publish.py with a key of its own: {}", text(&o));
        let refused = wait_until(DEADLINE, || (1..=3).all(|i| refused_untrusted(&env, i) > before[i - 1]));
        assert!(
            refused,
            "a node applied a batch signed by a key the namespace does not list"
        );

        // Least privilege: the publisher can neither write receipts nor touch the JetStream
        // API; the service user stays in its namespace and cannot delete stored messages.
        let forge = |url: &str, subject: &str| {
            Command::new(&python)
                .arg("-c")
                .arg("import sys; sys.path.insert(0, sys.argv[1]); import publish; publish.publish(sys.argv[2], sys.argv[3], b'x')")
                .arg(script.parent().unwrap())
                .arg(url)
                .arg(subject)
                .output()
                .unwrap()
        };
        for (url, subject) in [
            (
                get("INVALBUS_NATS_PUBLISHER_URL"),
                "invalbus.blog.audit.receipt.x.1.1.node-1",
            ),
            (get("INVALBUS_NATS_PUBLISHER_URL"), "$JS.API.STREAM.PURGE.INVALBUS_blog"),
            (
                get("INVALBUS_NATS_SERVICE_URL"),
                "$JS.API.STREAM.MSG.DELETE.INVALBUS_blog",
            ),
            (get("INVALBUS_NATS_SERVICE_URL"), "invalbus.other.inv.x"),
        ] {
            let o = forge(&url, subject);
            assert!(
                // nats-server says "Permissions Violation"; nats-py passes it on in lower case.
                !o.status.success() && text(&o).to_lowercase().contains("permissions violation"),
                "publishing on {subject} was not refused: {}",
                text(&o)
            );
        }
        let o = forge(&get("INVALBUS_NATS_SERVICE_URL"), "invalbus.blog.inv.x");
        assert!(o.status.success(), "the service user may publish batches: {}", text(&o));
        let o = forge(
            &get("INVALBUS_NATS_SERVICE_URL"),
            "invalbus.blog.audit.receipt.x.1.1.web-1",
        );
        assert!(o.status.success(), "the service user may write receipts: {}", text(&o));
    }

    // Lose a server (SIGKILL, as a crash): node-1, which was connected to it, fails over, and a
    // purge through it still reaches every node.
    let nats1 = pids.iter().find(|(n, _)| n == "nats-1").unwrap().1;
    let killed = Command::new("kill")
        .args(["-KILL", &nats1.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        wait_until(Duration::from_secs(10), || !running(nats1)),
        "nats-1 survived SIGKILL"
    );
    purge_reaches_every_node(&env, "author:43").unwrap_or_else(|e| panic!("purge after losing nats-1: {e}"));
    eprintln!(
        "purge after losing nats-1 applied by every node at {:?}",
        started.elapsed()
    );
    let status = cluster(&dir, base, "status");
    assert!(!status.status.success(), "status says all is well with nats-1 dead");
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("nats-1  not running"),
        "{}",
        text(&status)
    );

    let o = cluster(&dir, base, "down");
    assert!(o.status.success(), "cluster.sh down: {}", text(&o));
    std::mem::forget(down);
    let left: Vec<_> = pids.iter().filter(|(_, pid)| running(*pid)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    let h = node_cli(
        &env,
        &["health", "--addr", &get("INVALBUS_ADDR"), "--timeout-ms", "2000"],
    );
    assert!(
        !h.status.success(),
        "health says a stopped node is serving: {}",
        text(&h)
    );
    eprintln!("local cluster test done in {:?}", started.elapsed());
}

/// `refused_untrusted` in node-`i`'s stats (0 if it does not answer).
fn refused_untrusted(env: &[(String, String)], i: usize) -> u64 {
    let port = env
        .iter()
        .find(|(k, _)| k == "INVALBUS_ADDR")
        .map(|(_, v)| v.rsplit(':').next().unwrap().parse::<u16>().unwrap())
        .unwrap();
    let addr = format!("http://127.0.0.1:{}", port + (i as u16 - 1));
    let o = node_cli(env, &["stats", "--json", "--addr", &addr]);
    if !o.status.success() {
        return 0;
    }
    let r: Json = serde_json::from_slice(&o.stdout).unwrap_or_default();
    r["node"]["refused_untrusted"].as_u64().unwrap_or(0)
}

fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}
