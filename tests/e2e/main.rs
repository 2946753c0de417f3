//! End-to-end tests: the real `atoll` binary as separate processes on 127.0.0.1, real redb files
//! in temp dirs, talking HTTP. Nothing of ours is mocked.

mod bad_input;
mod deploy;
mod dev;
mod faults;
mod idempotency;
mod keyvalue;
mod limits;
mod observability;
mod operate;
mod refusals;
mod replication;
mod restart;
mod rotation;
mod routing;
mod security;
mod session;
mod shutdown;
mod tls;
mod ui;
mod wasi03;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ATOLL: &str = env!("CARGO_BIN_EXE_atoll");
const TOKEN: &str = "e2e-admin-token";
const PEER_SECRET: &str = "e2e-peer-secret-0123456789";

/// The deploy key every test site holds (and so signs what its admin token admits), as
/// `atoll dev` does; `security.rs` also runs sites that hold only its public key.
fn deploy_key_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        // One file for every run (in the target dir, not a new one in /tmp per run), written
        // whole under another name first: test processes running at once may both write it.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("e2e-deploy.key");
        let part = dir.join(format!("e2e-deploy.key.{}", std::process::id()));
        std::fs::write(&part, format!("{}\n", "5a".repeat(32))).expect("write the deploy key");
        std::fs::rename(&part, &path).expect("put the deploy key in place");
        path
    })
}

/// A running `atoll site` process, killed when dropped.
struct Site {
    child: Child,
    url: String,
    name: String,
    data: PathBuf,
    stderr_path: PathBuf,
    /// The arguments after `--data DIR`, kept for a restart.
    extra: Vec<String>,
    /// Extra environment variables, kept for a restart.
    env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl Site {
    /// Starts a site with a fresh temp data dir.
    fn start(name: &str) -> Site {
        Site::start_with(name, &[], None)
    }

    /// Starts a site with extra arguments and, optionally, a config file's contents.
    fn start_with(name: &str, extra: &[&str], config: Option<&str>) -> Site {
        Site::start_with_env(name, extra, config, &[])
    }

    /// [`Site::start_with`] with extra environment variables (e.g. libfaketime's).
    fn start_with_env(name: &str, extra: &[&str], config: Option<&str>, env: &[(&str, &str)]) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(config) = config {
            let path = dir.path().join("site.toml");
            std::fs::write(&path, config).expect("write config");
            args.extend(["--config".into(), path.display().to_string()]);
        }
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut site = Site::spawn(name, &data, &args, dir.path(), &env);
        site._dir = Some(dir);
        site
    }

    /// Starts a site on an existing data dir (a restart).
    fn spawn(name: &str, data: &Path, extra: &[String], logs: &Path, env: &[(String, String)]) -> Site {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr_path = logs.join(format!("{name}-{n}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let listen =
            if extra.iter().any(|a| a == "--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] };
        let region =
            if extra.iter().any(|a| a == "--region") { &[][..] } else { &["--region", "us-east"][..] };
        let mut child = Command::new(ATOLL)
            .args(["site", "--name", name])
            .args(region)
            .args(listen)
            .arg("--data")
            .arg(data)
            .args(extra)
            .env("ATOLL_ADMIN_TOKEN", TOKEN)
            .env("ATOLL_PEER_SECRET", PEER_SECRET)
            .env("ATOLL_ADMIN__DEPLOY_KEY_FILE", deploy_key_file())
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn atoll site");
        let url = wait_for_listen_line(&mut child, &stderr_path);
        let extra = extra.to_vec();
        Site {
            child,
            url,
            name: name.into(),
            data: data.to_owned(),
            stderr_path,
            extra,
            env: env.to_vec(),
            _dir: None,
        }
    }

    /// SIGKILLs the site.
    fn kill(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGKILLs the site (if running) and starts it again on the same data dir, name, arguments
    /// and address (as a restarted server would be).
    fn kill_and_restart(mut self) -> Site {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let logs = self.stderr_path.parent().expect("logs dir").to_owned();
        let mut extra = self.extra.clone();
        if !extra.iter().any(|a| a == "--listen") {
            extra.extend(["--listen".to_owned(), self.url.trim_start_matches("http://").to_owned()]);
        }
        let mut restarted = Site::spawn(&self.name, &self.data, &extra, &logs, &self.env);
        restarted._dir = self._dir.take();
        restarted
    }

    fn get(&self, path: &str) -> Response {
        request("GET", &format!("{}{path}", self.url), &[], None)
    }

    fn get_with_host(&self, host: &str, path: &str) -> Response {
        request("GET", &format!("{}{path}", self.url), &[("host", host)], None)
    }

    fn admin(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let auth = format!("Bearer {TOKEN}");
        // As `atoll deploy` does: an early refusal (413) arrives before the body is sent.
        let headers = [("authorization", auth.as_str()), ("expect", "100-continue")];
        let headers = if body.is_some() { &headers[..] } else { &headers[..1] };
        request(method, &format!("{}{path}", self.url), headers, body)
    }

    /// `atoll deploy` of a guest, asserting it succeeded; returns its stdout.
    fn deploy(&self, app: &str, wasm: &str, extra: &[&str]) -> String {
        let mut args = vec!["deploy", "--site", &self.url, "--app", app, wasm];
        args.extend_from_slice(extra);
        let out = atoll(&args);
        assert!(out.status.success(), "deploy failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `atoll router` process, killed when dropped.
struct RouterProc {
    child: Child,
    url: String,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl RouterProc {
    /// Starts `atoll router` on a free port with `--site` for each of `sites` and, optionally, a
    /// config file's contents.
    fn start(sites: &[&str], config: Option<&str>) -> RouterProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr_path = dir.path().join("router.stderr");
        let mut command = Command::new(ATOLL);
        command.args(["router", "--listen", "127.0.0.1:0"]);
        for site in sites {
            command.args(["--site", site]);
        }
        if let Some(config) = config {
            let path = dir.path().join("router.toml");
            std::fs::write(&path, config).expect("write config");
            command.arg("--config").arg(path);
        }
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn atoll router");
        let url = wait_for_listen_line(&mut child, &stderr_path);
        RouterProc { child, url, stderr_path, _dir: dir }
    }

    fn get(&self, path: &str, region: Option<&str>) -> Response {
        let headers: Vec<(&str, &str)> = region.map(|r| ("x-atoll-region", r)).into_iter().collect();
        request("GET", &format!("{}{path}", self.url), &headers, None)
    }

    fn status(&self) -> serde_json::Value {
        json(&self.get("/_atoll/router/status", None).body)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the site's stdout until it says where it listens (or dies, or 60 s pass).
fn wait_for_listen_line(child: &mut Child, stderr_path: &Path) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => url,
        Err(_) => {
            let _ = child.kill();
            panic!(
                "site did not start; stderr:\n{}",
                std::fs::read_to_string(stderr_path).unwrap_or_default()
            )
        }
    }
}

/// Runs the `atoll` CLI with the admin token in its environment.
fn atoll(args: &[&str]) -> Output {
    Command::new(ATOLL)
        .args(args)
        .env("ATOLL_ADMIN_TOKEN", TOKEN)
        .env("ATOLL_CLUSTER", "atoll")
        .output()
        .expect("run atoll")
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

/// An HTTP client that returns error statuses as responses, with an overall timeout.
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(timeout)).build().into()
}

fn request(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Response {
    let agent = agent(Duration::from_secs(60));
    let mut builder = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let result = match body {
        Some(body) => agent.run(builder.body(body.to_vec()).expect("request")),
        None => agent.run(builder.body(()).expect("request")),
    };
    let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
    Response { status, headers, body }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).expect("guest was built")
}
