//! The deployment files kept honest against the binary: every command, flag
//! and `AGENTMESH_*` variable that `docker/Dockerfile`, `docker/compose.yaml`
//! and `docker/k8s/` use is run through `agentmesh … --dump-config` (settings
//! load and validate, nothing starts) or through `agentmesh health` against a
//! running suite; the Kubernetes manifests follow the deployment rules; and
//! every metric and label the Grafana dashboard queries is exported by a
//! running suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_norway::Value as Yaml;

const BINARY: &str = env!("CARGO_BIN_EXE_agentmesh");

/// Variables the binary reads that are not `AGENTMESH_*` settings keys.
const NON_SETTING_ENV: &[&str] = &[
    "AGENTMESH_CONFIG",
    "AGENTMESH_LOG",
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "DEFAULT_LLM_MODEL",
    "DEFAULT_TEMPERATURE",
];

/// Default gRPC port of each service, as the deployment files use them.
const SERVICES: &[(&str, u16, &str)] = &[
    ("gateway", 50051, "agentmesh.gateway.v1.GatewayService"),
    ("agent", 50052, "agentmesh.agent.v1.AgentService"),
    ("config", 50053, "agentmesh.config.v1.ConfigService"),
    ("audit", 50054, "agentmesh.audit.v1.AuditService"),
    ("cache", 50055, "agentmesh.cache.v1.CacheService"),
];

/// Metrics the dashboard shows that another piece of work adds. The test
/// fails once one of them is exported, so that this list is emptied.
const PENDING_METRICS: &[&str] = &[];

/// Metrics recorded only when something fails: a healthy suite has no
/// series for them, so the test checks that the code records them under
/// that name instead.
const RECORDED_ON_FAILURE: &[&str] = &[
    "agentmesh_agent_provider_errors_total",
    "agentmesh_agent_provider_retries_total",
    "agentmesh_audit_commit_failures_total",
    "agentmesh_cache_l2_errors_total",
];

/// Metrics recorded only when the cache has Redis (L2).
const NEEDS_REDIS: &[&str] = &["agentmesh_cache_redis_seconds"];

/// Labels Prometheus adds when it scrapes (target labels), not the services.
const TARGET_LABELS: &[&str] = &["instance", "job", "service"];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

// ---------------------------------------------------------------------------
// Dry runs: settings load and validate with exactly the deployment's
// environment and arguments.

/// Runs `agentmesh <args> --dump-config` with only `env` set and returns the
/// effective settings.
fn dry_run(what: &str, args: &[String], env: &BTreeMap<String, String>) -> toml::Value {
    let output = Command::new(BINARY)
        .env_clear()
        .args(args)
        .arg("--dump-config")
        .envs(env)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what}: `agentmesh {} --dump-config` refused its settings: {stderr}",
        args.join(" ")
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    toml::from_str(&stdout).unwrap_or_else(|error| panic!("{what}: dump is not TOML: {error}"))
}

/// Asserts that every variable in `env` is one the binary reads, and that
/// each `AGENTMESH_*` setting shows up in the dumped settings with its value.
fn assert_env_applied(what: &str, env: &BTreeMap<String, String>, dump: &toml::Value) {
    for (name, value) in env {
        if NON_SETTING_ENV.contains(&name.as_str()) {
            continue;
        }
        let key = name.strip_prefix("AGENTMESH_").unwrap_or_else(|| {
            panic!(
                "{what}: {name} is neither an AGENTMESH_* setting nor a variable the binary reads"
            )
        });
        let path: Vec<String> = key.to_lowercase().split("__").map(str::to_owned).collect();
        let mut node = dump;
        for part in &path {
            node = node.get(part).unwrap_or_else(|| {
                panic!(
                    "{what}: {name} names no setting ({} missing in the dump)",
                    path.join(".")
                )
            });
        }
        // URLs with credentials are masked in the dump.
        if value.contains('@') {
            continue;
        }
        let expected: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|table| table.get("v").cloned())
            .filter(|parsed| parsed.type_str() == node.type_str())
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let comparable = |value: &toml::Value| match value {
            toml::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        assert_eq!(
            comparable(node),
            comparable(&expected),
            "{what}: {name}={value} did not set {}",
            path.join(".")
        );
    }
}

// ---------------------------------------------------------------------------
// docker/Dockerfile

/// What the runtime stage of the Dockerfile sets.
struct Dockerfile {
    env: BTreeMap<String, String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
    user: String,
}

fn parse_dockerfile() -> Dockerfile {
    let text = read("docker/Dockerfile");
    // Join continuation lines, drop comments.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut file = Dockerfile {
        env: BTreeMap::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        healthcheck: Vec::new(),
        user: String::new(),
    };
    let json_array = |text: &str| -> Vec<String> {
        serde_json::from_str(text.trim())
            .unwrap_or_else(|error| panic!("Dockerfile: {text} is not an exec-form array: {error}"))
    };
    for instruction in instructions {
        let (keyword, rest) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((instruction.as_str(), ""));
        match keyword.to_uppercase().as_str() {
            // Only the last stage (the image) counts.
            "FROM" => {
                file.env.clear();
                file.user.clear();
            }
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (name, value) = pair.split_once('=').expect("ENV name=value");
                    file.env.insert(name.to_owned(), value.to_owned());
                }
            }
            "ENTRYPOINT" => file.entrypoint = json_array(rest),
            "CMD" => file.cmd = json_array(rest),
            "USER" => file.user = rest.trim().to_owned(),
            "HEALTHCHECK" => {
                let (_, command) = rest.split_once("CMD").expect("HEALTHCHECK … CMD [...]");
                file.healthcheck = json_array(command);
            }
            _ => {}
        }
    }
    file
}

#[test]
fn dockerfile_runs_the_binary_as_non_root_with_settings_it_accepts() {
    let dockerfile = parse_dockerfile();
    assert_eq!(dockerfile.entrypoint, ["agentmesh"]);
    assert!(
        !dockerfile.user.is_empty()
            && !dockerfile.user.starts_with('0')
            && dockerfile.user != "root",
        "the image must run as a non-root user, not {:?}",
        dockerfile.user
    );
    assert_eq!(
        dockerfile
            .env
            .get("AGENTMESH_SERVER__HOST")
            .map(String::as_str),
        Some("0.0.0.0"),
        "listeners must bind every interface inside the container"
    );
    let dump = dry_run("Dockerfile CMD", &dockerfile.cmd, &dockerfile.env);
    assert_env_applied("Dockerfile", &dockerfile.env, &dump);
    assert_eq!(
        dockerfile.healthcheck.first().map(String::as_str),
        Some("agentmesh")
    );
    assert_eq!(
        dockerfile.healthcheck.get(1).map(String::as_str),
        Some("health")
    );
}

// ---------------------------------------------------------------------------
// docker/compose.yaml

/// One service of the compose file that runs our image.
struct ComposeService {
    name: String,
    command: Vec<String>,
    env: BTreeMap<String, String>,
    healthcheck: Vec<String>,
    depends_on: BTreeMap<String, String>,
}

fn yaml_string(value: &Yaml) -> String {
    match value {
        Yaml::String(text) => text.clone(),
        Yaml::Number(number) => number.to_string(),
        Yaml::Bool(flag) => flag.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn yaml_strings(value: &Yaml) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| items.iter().map(yaml_string).collect())
        .unwrap_or_default()
}

fn compose() -> Yaml {
    let mut compose: Yaml = serde_norway::from_str(&read("docker/compose.yaml")).unwrap();
    compose.apply_merge().unwrap();
    compose
}

fn compose_agentmesh_services(compose: &Yaml) -> Vec<ComposeService> {
    let dockerfile = parse_dockerfile();
    let mut found = Vec::new();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let uses_our_image = service["build"]["dockerfile"].as_str() == Some("docker/Dockerfile");
        if !uses_our_image {
            continue;
        }
        // The container's environment: the image's ENV, then the service's.
        let mut env = dockerfile.env.clone();
        if let Some(environment) = service["environment"].as_mapping() {
            for (key, value) in environment {
                env.insert(yaml_string(key), yaml_string(value));
            }
        }
        let command = match service.get("command") {
            Some(command) => yaml_strings(command),
            None => dockerfile.cmd.clone(),
        };
        let depends_on = service["depends_on"]
            .as_mapping()
            .map(|deps| {
                deps.iter()
                    .map(|(dep, how)| (yaml_string(dep), yaml_string(&how["condition"])))
                    .collect()
            })
            .unwrap_or_default();
        found.push(ComposeService {
            name: yaml_string(name),
            command,
            env,
            healthcheck: yaml_strings(&service["healthcheck"]["test"]),
            depends_on,
        });
    }
    found
}

#[test]
fn compose_services_run_commands_and_environment_the_binary_accepts() {
    let compose = compose();
    let services = compose_agentmesh_services(&compose);
    let names: BTreeSet<&str> = services
        .iter()
        .map(|service| service.name.as_str())
        .collect();
    for expected in [
        "gateway", "config", "audit", "cache", "agent-1", "agent-2", "migrate",
    ] {
        assert!(
            names.contains(expected),
            "compose has no {expected} service: {names:?}"
        );
    }
    for service in &services {
        let dump = dry_run(
            &format!("compose {}", service.name),
            &service.command,
            &service.env,
        );
        assert_env_applied(&format!("compose {}", service.name), &service.env, &dump);
        assert_eq!(
            dump["server"]["host"].as_str(),
            Some("0.0.0.0"),
            "{}",
            service.name
        );
        if service.name == "migrate" {
            continue;
        }
        assert_eq!(
            service.healthcheck.get(..3).map(|head| head.join(" ")),
            Some("CMD agentmesh health".to_owned()),
            "{}: healthcheck must be our gRPC health check",
            service.name
        );
        // Health-gated start order: nothing starts before what it needs is healthy.
        for (dependency, condition) in &service.depends_on {
            assert!(
                condition == "service_healthy"
                    || (dependency == "migrate" && condition == "service_completed_successfully")
                    || dependency == "otel-collector",
                "{} waits for {dependency} with {condition}",
                service.name
            );
        }
    }
    // The gateway is pointed at both agent nodes.
    let gateway = services
        .iter()
        .find(|service| service.name == "gateway")
        .unwrap();
    let dump = dry_run("compose gateway", &gateway.command, &gateway.env);
    let endpoints: Vec<&str> = dump["gateway"]["agent_endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(toml::Value::as_str)
        .collect();
    assert_eq!(endpoints, ["http://agent-1:50052", "http://agent-2:50052"]);
    // Named volumes only, each declared.
    let declared: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(yaml_string)
        .collect();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        for volume in yaml_strings(&service["volumes"]) {
            let source = volume.split(':').next().unwrap();
            match source.strip_prefix("./") {
                Some(file) => assert!(
                    repo_file("docker").join(file).is_file(),
                    "{name:?}: mounts docker/{file}, which does not exist"
                ),
                None => assert!(
                    declared.contains(source),
                    "{name:?}: volume {volume} is not a declared named volume"
                ),
            }
        }
    }
    // Prometheus scrapes the admin endpoint of every agentmesh container.
    let prometheus: Yaml = serde_norway::from_str(&read("docker/prometheus.yml")).unwrap();
    let targets: BTreeSet<String> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|config| yaml_strings(&config["targets"]))
        .collect();
    for service in services.iter().filter(|service| service.name != "migrate") {
        let dump = dry_run(
            &format!("compose {}", service.name),
            &service.command,
            &service.env,
        );
        let target = format!(
            "{}:{}",
            service.name,
            dump["ports"]["admin"].as_integer().unwrap()
        );
        assert!(
            targets.contains(&target),
            "docker/prometheus.yml does not scrape {target}"
        );
    }
}

// ---------------------------------------------------------------------------
// docker/k8s/

fn k8s_documents() -> Vec<(String, Yaml)> {
    let mut documents = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_file("docker/k8s"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for document in text.split("\n---\n") {
            let value: Yaml =
                serde_norway::from_str(document).unwrap_or_else(|error| panic!("{file}: {error}"));
            if !value.is_null() {
                documents.push((file.clone(), value));
            }
        }
    }
    documents
}

fn of_kind<'a>(documents: &'a [(String, Yaml)], kind: &str) -> Vec<&'a Yaml> {
    documents
        .iter()
        .filter(|(_, document)| document["kind"].as_str() == Some(kind))
        .map(|(_, document)| document)
        .collect()
}

fn labels(value: &Yaml) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|mapping| {
            mapping
                .iter()
                .map(|(key, value)| (yaml_string(key), yaml_string(value)))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| pod_labels.get(key) == Some(value))
}

#[test]
fn kubernetes_manifests_follow_the_deployment_rules_with_settings_the_binary_accepts() {
    let documents = k8s_documents();
    let config_maps = of_kind(&documents, "ConfigMap");
    let secrets = of_kind(&documents, "Secret");
    let services = of_kind(&documents, "Service");
    let budgets = of_kind(&documents, "PodDisruptionBudget");
    let deployments = of_kind(&documents, "Deployment");
    assert_eq!(deployments.len(), 5, "one Deployment per service");

    // The config file from the ConfigMap, where the pods mount it.
    let scratch = tempfile::tempdir().unwrap();
    let mut mounted_files = BTreeMap::new();
    for config_map in &config_maps {
        let name = config_map["metadata"]["name"].as_str().unwrap();
        let dir = scratch.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, content) in config_map["data"].as_mapping().unwrap() {
            std::fs::write(dir.join(yaml_string(file)), yaml_string(content)).unwrap();
        }
        mounted_files.insert(name.to_owned(), dir);
    }
    let secret_env = |name: &str| -> BTreeMap<String, String> {
        let secret = secrets
            .iter()
            .find(|secret| secret["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no Secret {name}"));
        labels(&secret["stringData"])
    };

    let headless: Vec<&&Yaml> = services
        .iter()
        .filter(|service| service["spec"]["clusterIP"].as_str() == Some("None"))
        .collect();
    assert_eq!(
        headless.len(),
        1,
        "one headless Service, for the agent nodes"
    );
    let headless_name = headless[0]["metadata"]["name"].as_str().unwrap();

    for deployment in &deployments {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = &deployment["spec"]["template"];
        let pod_labels = labels(&pod["metadata"]["labels"]);
        assert!(
            selects(
                &labels(&deployment["spec"]["selector"]["matchLabels"]),
                &pod_labels
            ),
            "{name}: selector does not match its pods"
        );
        let containers = pod["spec"]["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1, "{name}");
        let container = &containers[0];
        let args = yaml_strings(&container["args"]);
        let component = args.get(1).cloned().unwrap_or_default();
        let &(_, default_port, health_name) = SERVICES
            .iter()
            .find(|(service, _, _)| *service == component)
            .unwrap_or_else(|| panic!("{name}: args {args:?} do not serve one service"));

        // Settings: Secret (envFrom), then env; the config file from the
        // ConfigMap mount.
        let mut env = BTreeMap::new();
        for source in container["envFrom"].as_sequence().unwrap() {
            let secret = source["secretRef"]["name"]
                .as_str()
                .expect("envFrom a Secret");
            env.extend(secret_env(secret));
        }
        for variable in container["env"].as_sequence().unwrap() {
            let key = yaml_string(&variable["name"]);
            let value = match variable.get("value") {
                Some(value) => yaml_string(value),
                // A downward-API value such as the pod name.
                None => format!("{component}-pod-0"),
            };
            env.insert(key, value);
        }
        let mounts: BTreeMap<String, String> = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|mount| {
                (
                    yaml_string(&mount["mountPath"]),
                    yaml_string(&mount["name"]),
                )
            })
            .collect();
        let volumes = pod["spec"]["volumes"].as_sequence().unwrap();
        let mut run_env = env.clone();
        if let Some(config_path) = env.get("AGENTMESH_CONFIG") {
            let (dir, file) = config_path.rsplit_once('/').unwrap();
            let volume_name = &mounts[dir];
            let volume = volumes
                .iter()
                .find(|volume| volume["name"].as_str() == Some(volume_name.as_str()))
                .unwrap();
            let config_map = volume["configMap"]["name"].as_str().unwrap();
            run_env.insert(
                "AGENTMESH_CONFIG".to_owned(),
                mounted_files[config_map].join(file).display().to_string(),
            );
        }
        // The image's ENV is there too.
        for (key, value) in parse_dockerfile().env {
            run_env.entry(key).or_insert(value);
        }
        let dump = dry_run(&format!("k8s {name}"), &args, &run_env);
        assert_env_applied(&format!("k8s {name}"), &env, &dump);

        // Ports: the container port, the probes and the setting agree.
        let port = dump["ports"][component.as_str()].as_integer().unwrap();
        assert_eq!(port, i64::from(default_port), "{name}");
        let ports = container["ports"].as_sequence().unwrap();
        let grpc_port = ports
            .iter()
            .find(|entry| entry["name"].as_str() == Some(&format!("grpc-{component}")))
            .unwrap_or_else(|| panic!("{name}: no port named grpc-{component}"));
        assert_eq!(grpc_port["containerPort"].as_i64(), Some(port), "{name}");
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let grpc = &container[probe]["grpc"];
            assert_eq!(grpc["port"].as_i64(), Some(port), "{name} {probe}");
            assert_eq!(
                grpc["service"].as_str(),
                Some(health_name),
                "{name} {probe}"
            );
        }

        // Drain: the pod gets the shutdown delay plus the grace period.
        let delay_seconds = dump["server"]["shutdown_delay_ms"].as_integer().unwrap() / 1000;
        let grace = dump["server"]["shutdown_grace_seconds"]
            .as_integer()
            .unwrap();
        let termination = pod["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap();
        assert!(
            delay_seconds > 0,
            "{name}: set server.shutdown_delay_ms behind Kubernetes"
        );
        assert!(
            termination >= delay_seconds + grace && termination <= delay_seconds + grace + 15,
            "{name}: terminationGracePeriodSeconds {termination} does not match the drain ({delay_seconds} s delay + {grace} s grace)"
        );

        // Resources and a locked-down container.
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    !container["resources"][bound][resource].is_null(),
                    "{name}: no {bound}.{resource}"
                );
            }
        }
        assert_eq!(
            pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{name}"
        );
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{name}"
        );
        assert_eq!(
            mounts
                .get(dump["data_dir"].as_str().unwrap())
                .map(String::as_str),
            Some("data"),
            "{name}: data_dir must be a writable volume"
        );

        // A Service for it, with what Istio and Linkerd need for gRPC.
        let service = services
            .iter()
            .find(|service| selects(&labels(&service["spec"]["selector"]), &pod_labels))
            .unwrap_or_else(|| panic!("{name}: no Service selects its pods"));
        let service_port = service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|entry| entry["port"].as_i64() == Some(port))
            .unwrap_or_else(|| panic!("{name}: its Service has no port {port}"));
        assert!(
            service_port["name"].as_str().unwrap().starts_with("grpc-"),
            "{name}: Service port name must start with grpc-"
        );
        assert_eq!(service_port["appProtocol"].as_str(), Some("grpc"), "{name}");
        if component == "agent" {
            assert_eq!(service["metadata"]["name"].as_str(), Some(headless_name));
        }
        if component == "gateway" {
            let endpoints = dump["gateway"]["agent_endpoints"].as_array().unwrap();
            assert_eq!(
                endpoints
                    .iter()
                    .filter_map(toml::Value::as_str)
                    .collect::<Vec<_>>(),
                [format!("http://{headless_name}:50052")],
                "the gateway must find agent nodes through the headless Service"
            );
        }

        // A disruption budget.
        assert!(
            budgets.iter().any(|budget| selects(
                &labels(&budget["spec"]["selector"]["matchLabels"]),
                &pod_labels
            )),
            "{name}: no PodDisruptionBudget"
        );
    }
}

// ---------------------------------------------------------------------------
// A running suite: health checks and metrics.

/// `agentmesh up` on ephemeral ports, with its addresses from its JSON logs.
struct Suite {
    child: Child,
    /// gRPC address of each service (`127.0.0.1:port`), by short name.
    grpc: BTreeMap<&'static str, String>,
    admin: String,
}

impl Drop for Suite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_suite(data_dir: &Path, extra_args: &[&str], env: &[(&str, String)]) -> Suite {
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .args(["up", "--data-dir"])
        .arg(data_dir)
        .args(["--log-format", "json", "--admin-port", "0"])
        .args([
            "--config-port",
            "0",
            "--cache-port",
            "0",
            "--audit-port",
            "0",
        ])
        .args(["--gateway-port", "0"])
        .args(extra_args)
        .env("AGENTMESH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !extra_args.contains(&"--agent-port") {
        command.args(["--agent-port", "0"]);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                // Nobody listens any more; keep draining so the child never blocks.
                continue;
            }
        }
    });
    let mut grpc = BTreeMap::new();
    let mut admin = None;
    while grpc.len() < SERVICES.len() || admin.is_none() {
        let line = receiver
            .recv_timeout(Duration::from_secs(60))
            .expect("agentmesh up did not log its addresses");
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &json["fields"];
        let message = fields["message"].as_str().unwrap_or_default();
        let address = fields["address"].as_str().unwrap_or_default().to_owned();
        if message.starts_with("admin endpoint listening") {
            admin = Some(address);
        } else if message.starts_with("grpc server listening") {
            let services = fields["services"].as_str().unwrap_or_default();
            for &(short, _, full) in SERVICES {
                if services.contains(full) {
                    grpc.insert(short, address.clone());
                }
            }
        }
    }
    Suite {
        child,
        grpc,
        admin: admin.unwrap(),
    }
}

/// Runs `agentmesh <args>` with only `env`; returns (success, stdout, stderr).
fn run_binary(args: &[String], env: &[(String, String)]) -> (bool, String, String) {
    let output = Command::new(BINARY)
        .env_clear()
        .args(args)
        .envs(env.iter().map(|(key, value)| (key, value)))
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Replaces the port of `--addr http://host:PORT` with the suite's address
/// of the service that listens on PORT by default.
fn retarget(args: &[String], suite: &Suite) -> Vec<String> {
    let mut out = args.to_vec();
    if let Some(index) = out.iter().position(|arg| arg == "--addr") {
        let addr = &out[index + 1];
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let &(short, _, _) = SERVICES
            .iter()
            .find(|(_, default_port, _)| *default_port == port)
            .unwrap_or_else(|| panic!("{addr} is no service's port"));
        out[index + 1] = format!("http://{}", suite.grpc[short]);
    }
    out
}

#[test]
fn deployment_health_checks_pass_against_a_running_suite() {
    let data_dir = tempfile::tempdir().unwrap();
    let suite = start_suite(data_dir.path(), &[], &[]);
    let port_env: Vec<(String, String)> = suite
        .grpc
        .iter()
        .map(|(short, address)| {
            (
                format!("AGENTMESH_PORTS__{}", short.to_uppercase()),
                address.rsplit(':').next().unwrap().to_owned(),
            )
        })
        .collect();

    // Startup is over when every health check says SERVING; until then a
    // check may fail, so each is retried a bounded number of times.
    let check = |what: &str, args: Vec<String>, env: &[(String, String)]| {
        let mut last = (false, String::new(), String::new());
        for _ in 0..50 {
            last = run_binary(&args, env);
            if last.0 {
                assert!(last.1.contains("SERVING"), "{what}: {}", last.1);
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{what}: `agentmesh {}` failed: {} {}",
            args.join(" "),
            last.1,
            last.2
        );
    };

    // The Dockerfile's HEALTHCHECK: every listener of this host's settings.
    let dockerfile = parse_dockerfile();
    let mut env: Vec<(String, String)> = dockerfile.env.clone().into_iter().collect();
    env.extend(port_env.iter().cloned());
    check(
        "Dockerfile HEALTHCHECK",
        dockerfile.healthcheck[1..].to_vec(),
        &env,
    );

    // compose healthchecks.
    let compose = compose();
    for service in compose_agentmesh_services(&compose) {
        if service.healthcheck.is_empty() {
            continue;
        }
        let args = retarget(&service.healthcheck[2..], &suite);
        check(&format!("compose {}", service.name), args, &[]);
    }

    // Kubernetes gRPC probes: the same port and service name, through our
    // health check (the kubelet speaks the same protocol).
    for deployment in of_kind(&k8s_documents(), "Deployment") {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let grpc = &container["readinessProbe"]["grpc"];
        let args = vec![
            "health".to_owned(),
            "--addr".to_owned(),
            format!("http://127.0.0.1:{}", grpc["port"].as_i64().unwrap()),
            "--service".to_owned(),
            yaml_string(&grpc["service"]),
        ];
        check(
            &format!("k8s {}", deployment["metadata"]["name"].as_str().unwrap()),
            retarget(&args, &suite),
            &[],
        );
    }

    // A wrong service name is NOT healthy.
    let (ok, _, stderr) = run_binary(
        &[
            "health".to_owned(),
            "--addr".to_owned(),
            format!("http://{}", suite.grpc["gateway"]),
            "--service".to_owned(),
            "agentmesh.gateway.v1.NoSuchService".to_owned(),
        ],
        &[],
    );
    assert!(!ok, "an unknown service must not pass: {stderr}");
}

/// Metric families of a Prometheus text page: name → (type, label names).
fn metric_families(page: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut families: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.entry(name.to_owned()).or_default().0 = kind.to_owned();
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
        }
    }
    for line in page
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
    {
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = [
            name,
            name.trim_end_matches("_bucket"),
            name.trim_end_matches("_sum"),
            name.trim_end_matches("_count"),
        ]
        .into_iter()
        .find(|candidate| families.contains_key(*candidate))
        .unwrap_or_else(|| panic!("{name} has no # TYPE line"));
        let entry = families.get_mut(family).unwrap();
        for pair in labels.split("\",").filter(|pair| !pair.is_empty()) {
            entry.1.insert(pair.split('=').next().unwrap().to_owned());
        }
    }
    for name in families.keys() {
        assert!(
            helped.contains(name),
            "{name} has no # HELP text (promtool check metrics fails)"
        );
    }
    families
}

/// Every PromQL text in the dashboard (panel targets and variable queries).
fn dashboard_queries(value: &serde_json::Value, found: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", serde_json::Value::String(text)) => {
                        found.push(text.clone())
                    }
                    _ => dashboard_queries(value, found),
                }
            }
        }
        serde_json::Value::Array(items) => {
            items.iter().for_each(|item| dashboard_queries(item, found))
        }
        _ => {}
    }
}

/// A port on loopback where every connection is accepted and dropped at
/// once: an agent node that is down.
fn dead_node() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

#[test]
fn every_metric_and_label_the_dashboard_queries_is_exported() {
    // The gateway routes over this process's agent and a node that is down,
    // so breakers change state and every panel has data.
    let agent_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead_port = dead_node();
    let data_dir = tempfile::tempdir().unwrap();
    let agent_port_text = agent_port.to_string();
    let mut env = vec![(
        "AGENTMESH_GATEWAY__AGENT_ENDPOINTS",
        format!(r#"["http://127.0.0.1:{agent_port}","http://127.0.0.1:{dead_port}"]"#),
    )];
    // Most repeated bench tasks are response-cache hits that never reach a
    // node: one failure must be enough to open the dead node's breaker.
    env.push((
        "AGENTMESH_DEFAULTS__BREAKER__FAILURE_THRESHOLD",
        "1".to_owned(),
    ));
    let redis = std::env::var("AGENTMESH_TEST_REDIS_URL").ok();
    match &redis {
        Some(url) => {
            env.push(("AGENTMESH_REDIS_URL", url.clone()));
            env.push((
                "AGENTMESH_CACHE__KEY_PREFIX",
                format!("deploy-files-{}:", std::process::id()),
            ));
        }
        None => assert!(
            std::env::var("AGENTMESH_TEST_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "AGENTMESH_TEST_REQUIRE_SERVICES=1 but AGENTMESH_TEST_REDIS_URL is not set"
        ),
    }
    let suite = start_suite(data_dir.path(), &["--agent-port", &agent_port_text], &env);
    let bench = |target: &str, rpc: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "bench", "--target", target, "--rpc", rpc, "-c", "2", "-n", "30",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let (ok, stdout, stderr) = run_binary(&args, &[]);
        assert!(ok, "bench {rpc}: {stdout} {stderr}");
    };
    bench(&suite.grpc["gateway"], "gateway.execute", &[]);
    bench(&suite.grpc["cache"], "cache.get", &["--hit", "l1"]);
    bench(&suite.grpc["cache"], "cache.get", &["--hit", "miss"]);
    bench(&suite.grpc["audit"], "audit.append", &[]);
    let (ok, stdout, stderr) = run_binary(
        &[
            "audit".to_owned(),
            "verify".to_owned(),
            "--target".to_owned(),
            suite.grpc["audit"].clone(),
        ],
        &[],
    );
    assert!(ok, "audit verify: {stdout} {stderr}");

    let page = http_get(&suite.admin, "/metrics");
    let families = metric_families(&page);
    let grpc_services: BTreeSet<&str> = SERVICES.iter().map(|(_, _, full)| *full).collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("docker/grafana/agentmesh.json")).unwrap();
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(
        queries.len() > 20,
        "the dashboard has {} queries",
        queries.len()
    );

    let by_clause = regex::Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    let selector = regex::Regex::new(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}").unwrap();
    let matcher = regex::Regex::new(r#"([a-z_][a-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)""#).unwrap();
    let metric = regex::Regex::new(r"\b(?:agentmesh|grpc)_[a-z0-9_]+\b").unwrap();
    let label_values =
        regex::Regex::new(r"label_values\(\s*([a-z0-9_]+)\s*,\s*([a-z0-9_]+)\s*\)").unwrap();

    let mut missing = BTreeSet::new();
    let mut pending_seen = BTreeSet::new();
    let family_of = |name: &str| -> Option<String> {
        if families.contains_key(name) {
            return Some(name.to_owned());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            let kind = families.get(base)?.0.as_str();
            // Histograms without configured buckets render as summaries.
            (kind == "histogram" || (kind == "summary" && *suffix != "_bucket"))
                .then(|| base.to_owned())
        })
    };
    let is_pending = |name: &str| {
        PENDING_METRICS.iter().any(|pending| {
            name == *pending
                || name
                    .strip_prefix(pending)
                    .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest))
        })
    };
    for query in &queries {
        // Metrics with the labels their selectors name.
        let mut in_query = Vec::new();
        let without_label_values = label_values.replace_all(query, "$1");
        let without_selectors = selector.replace_all(&without_label_values, "$1");
        let bare = by_clause.replace_all(&without_selectors, "");
        for name in metric.find_iter(&bare).map(|found| found.as_str()) {
            if is_pending(name) {
                pending_seen.insert(name.to_owned());
                continue;
            }
            match family_of(name) {
                Some(family) => in_query.push(family),
                None if RECORDED_ON_FAILURE.contains(&name)
                    || (redis.is_none()
                        && NEEDS_REDIS.iter().any(|needs| name.starts_with(needs))) =>
                {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| name.strip_suffix(suffix))
                        .unwrap_or(name);
                    assert!(
                        recorded_in_source(base),
                        "no code records {base} (in {query})"
                    );
                }
                None => {
                    missing.insert(format!("{name} (in {query})"));
                }
            }
        }
        for captures in selector.captures_iter(query) {
            let Some(family) = family_of(&captures[1]) else {
                continue;
            };
            for matched in matcher.captures_iter(&captures[2]) {
                let label = &matched[1];
                assert!(
                    families[&family].1.contains(label),
                    "{family} has no label {label} (in {query})"
                );
                if label == "grpc_service" && &matched[2] == "=" {
                    assert!(
                        grpc_services.contains(&matched[3]),
                        "no gRPC service {} (in {query})",
                        &matched[3]
                    );
                }
            }
        }
        for captures in by_clause.captures_iter(query) {
            for label in captures[1]
                .split(',')
                .map(str::trim)
                .filter(|label| !label.is_empty())
            {
                if label == "le" || TARGET_LABELS.contains(&label) {
                    continue;
                }
                for family in &in_query {
                    assert!(
                        families[family].1.contains(label),
                        "{family} has no label {label} (in {query})"
                    );
                }
            }
        }
        for captures in label_values.captures_iter(query) {
            let family =
                family_of(&captures[1]).unwrap_or_else(|| panic!("{} (in {query})", &captures[1]));
            assert!(
                families[&family].1.contains(&captures[2]),
                "{family} has no label {}",
                &captures[2]
            );
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:#?}"
    );
    for pending in PENDING_METRICS {
        assert!(
            !families.contains_key(*pending),
            "{pending} is exported now: remove it from PENDING_METRICS so the dashboard test checks it"
        );
    }
    assert!(
        !pending_seen.is_empty() || PENDING_METRICS.is_empty(),
        "PENDING_METRICS lists metrics the dashboard does not use: {PENDING_METRICS:?}"
    );
}

/// Whether a `.rs` file under services/ or shared/ (other than the help
/// text table) names `metric` as a string literal.
fn recorded_in_source(metric: &str) -> bool {
    fn visit(dir: &Path, needle: &str) -> bool {
        std::fs::read_dir(dir).unwrap().any(|entry| {
            let path = entry.unwrap().path();
            if path.is_dir() {
                return path.file_name().is_some_and(|name| name != "target")
                    && visit(&path, needle);
            }
            path.extension().is_some_and(|ext| ext == "rs")
                && path
                    .file_name()
                    .is_some_and(|name| name != "metric_descriptions.rs")
                && std::fs::read_to_string(&path).unwrap().contains(needle)
        })
    }
    let needle = format!("\"{metric}\"");
    ["services", "shared"]
        .iter()
        .any(|dir| visit(&repo_file(dir), &needle))
}

fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(" 200 "), "{head}");
    body.to_owned()
}

#[test]
fn health_fails_when_nothing_listens() {
    // Ports nobody listens on: reserved, then released.
    let ports: Vec<u16> = (0..5)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect::<Vec<_>>()
        .iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect();
    let env: Vec<(String, String)> = ["GATEWAY", "AGENT", "CONFIG", "AUDIT", "CACHE"]
        .iter()
        .zip(&ports)
        .map(|(name, port)| (format!("AGENTMESH_PORTS__{name}"), port.to_string()))
        .collect();
    let (ok, _, stderr) = run_binary(&["health".to_owned()], &env);
    assert!(!ok, "no listener must not be healthy");
    assert!(stderr.contains("no gRPC listener"), "{stderr}");

    let (ok, _, stderr) = run_binary(
        &[
            "health".to_owned(),
            "--addr".to_owned(),
            format!("http://127.0.0.1:{}", ports[0]),
            "--timeout".to_owned(),
            "1s".to_owned(),
        ],
        &[],
    );
    assert!(!ok, "a refused connection must not be healthy");
    assert!(stderr.contains(&ports[0].to_string()), "{stderr}");
}
