//! `chartlog-bench`: drives the HTTP API of a node over loopback TCP and reports chart writes
//! per second, audited reads per second and their latency. Beside them it reports baselines:
//! raw appends of envelopes of the same size to a log of the same kind (the embedded log on the
//! same disk, or the same Kafka broker), run in the same process.
//!
//! Phases: (1) saturate with writes (each a new Observation, durable before the answer);
//! (2) saturate with reads (each appends a durable access event before the answer); (3) offer
//! half the measured write rate and half the read rate, paced; (4) offer fixed rates, by default
//! half the targets; (5) the baselines. They append one envelope at a time, then as many as the
//! writer put in one batch on average in phase 1, then 64. On the embedded log an append is a
//! synced RocksDB write; on Kafka it is a transaction. Last, the CPU time per operation of the
//! saturated writes and of the same-size baseline, for this process and, given its process id,
//! the broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chartlog::api::{self, AppState};
use chartlog::auth::dev_issuer::{self, DevIssuer};
use chartlog::auth::{Authenticator, IssuerConfig};
use chartlog::log::{EmbeddedLog, EventLog, KafkaConfig, KafkaLog};
use chartlog::node::{Node, NodeConfig};
use chartlog_schemas::Envelope;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(
    name = "chartlog-bench",
    about = "Measure Chartlog's HTTP throughput and latency on the embedded log"
)]
struct Args {
    /// Seconds each saturation phase runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Offered write rate, per second, of the paced write phase: half the 5,000 writes/s that
    /// Chartlog targets on 2 cores.
    #[arg(long, default_value_t = 2500.0)]
    write_rate: f64,
    /// Offered read rate, per second, of the paced read phase: half the 10,000 audited
    /// reads/s that Chartlog targets on 2 cores.
    #[arg(long, default_value_t = 5000.0)]
    read_rate: f64,
    /// Log backend: embedded, or kafka on the broker named by CHARTLOG_KAFKA_BOOTSTRAP_SERVERS
    /// (each run writes topics of its own).
    #[arg(long, default_value = "embedded")]
    log_backend: String,
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Directory for the bench's data (a temporary directory inside it is used and removed).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Process id of the Kafka broker on this machine, to count its CPU time per write as well.
    #[arg(long)]
    broker_pid: Option<u32>,
}

/// CPU time a process has used so far, user and system, from `/proc/PID/stat`; `None` where
/// that cannot be read.
fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |pid| format!("/proc/{pid}/stat"),
    );
    let text = std::fs::read_to_string(path).ok()?;
    // The command name, field 2, is in parentheses and may hold spaces: count from after it.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    // Linux reports these in USER_HZ ticks, 100 per second.
    Some(Duration::from_millis((user + system) * 10))
}

/// CPU time used by the bench's own process and by the broker, between two readings.
#[derive(Clone, Copy)]
struct CpuReading {
    process: Option<Duration>,
    broker: Option<Duration>,
}

impl CpuReading {
    fn now(broker_pid: Option<u32>) -> CpuReading {
        CpuReading {
            process: cpu_time(None),
            broker: broker_pid.and_then(|pid| cpu_time(Some(pid))),
        }
    }

    /// Returns the CPU milliseconds per operation since `earlier`, for the process and the
    /// broker.
    fn per_operation(&self, earlier: &CpuReading, operations: f64) -> (Option<f64>, Option<f64>) {
        let per = |now: Option<Duration>, then: Option<Duration>| {
            Some(now?.saturating_sub(then?).as_secs_f64() * 1000.0 / operations.max(1.0))
        };
        (
            per(self.process, earlier.process),
            per(self.broker, earlier.broker),
        )
    }
}

/// A keep-alive HTTP/1.1 client over one TCP connection: enough for the bench's requests.
struct Connection {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Connection {
    async fn open(address: SocketAddr) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream: BufReader::new(stream),
            host: address.to_string(),
        })
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(512);
        while !head.ends_with(b"\r\n\r\n") {
            let byte = self.stream.read_u8().await?;
            head.push(byte);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let status: u16 = head.split(' ').nth(1).context("no status")?.parse()?;
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, String::from_utf8_lossy(&body).to_string()))
    }
}

struct Stats {
    latencies_micros: Vec<u64>,
    elapsed: Duration,
}

impl Stats {
    fn per_second(&self) -> f64 {
        self.latencies_micros.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, percentile: f64) -> f64 {
        let mut sorted = self.latencies_micros.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0.0;
        }
        let index = ((sorted.len() as f64 * percentile).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index] as f64 / 1000.0
    }
}

fn observation(patient_id: &str, index: u64) -> String {
    format!(
        r#"{{"resourceType":"Observation","status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}}]}},"subject":{{"reference":"Patient/{patient_id}"}},"effectiveDateTime":"2026-01-01T10:00:00Z","valueQuantity":{{"value":{},"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}}}"#,
        60 + index % 40
    )
}

/// Runs `connections` workers for `duration`, each calling `step` in a loop, optionally paced
/// to `rate_per_second` in total.
async fn run_phase<F, Fut>(
    address: SocketAddr,
    connections: usize,
    duration: Duration,
    rate_per_second: Option<f64>,
    step: F,
) -> anyhow::Result<Stats>
where
    F: Fn(usize, u64, Connection) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<(Connection, u64)>> + Send,
{
    let started = Instant::now();
    let counter = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..connections {
        let step = step.clone();
        let counter = counter.clone();
        workers.push(tokio::spawn(async move {
            let mut connection = Connection::open(address).await?;
            let mut latencies = Vec::new();
            let interval =
                rate_per_second.map(|rate| Duration::from_secs_f64(connections as f64 / rate));
            // Spread the workers' first sends over one interval, so paced load arrives evenly
            // instead of in bursts of one request per connection.
            let offset = interval.map_or(Duration::ZERO, |interval| {
                interval.mul_f64(worker as f64 / connections as f64)
            });
            let mut next_send = Instant::now() + offset;
            while started.elapsed() < duration {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next_send.into()).await;
                    next_send += interval;
                }
                let index = counter.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let (returned, _) = step(worker, index, connection).await?;
                connection = returned;
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies_micros = Vec::new();
    for worker in workers {
        latencies_micros.extend(worker.await??);
    }
    Ok(Stats {
        latencies_micros,
        elapsed: started.elapsed(),
    })
}

fn baseline(
    log: &dyn EventLog,
    envelope_bytes: usize,
    duration: Duration,
    batch: usize,
) -> anyhow::Result<f64> {
    let envelopes: Vec<Envelope> = (0..batch)
        .map(|_| Envelope(vec![0xa5; envelope_bytes]))
        .collect();
    let started = Instant::now();
    let mut appended = 0u64;
    while started.elapsed() < duration {
        log.append_batch(&envelopes)?;
        appended += batch as u64;
    }
    Ok(appended as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create the bench directory {}", args.dir.display()))?;
    let scratch = tempfile::tempdir_in(&args.dir).with_context(|| {
        format!(
            "cannot create a scratch directory in {}",
            args.dir.display()
        )
    })?;
    let kafka = match args.log_backend.as_str() {
        "embedded" => None,
        "kafka" => {
            let mut settings = KafkaConfig::from_env(None)?
                .context("the kafka mode needs CHARTLOG_KAFKA_BOOTSTRAP_SERVERS")?;
            settings.topic = format!("chartlog-bench-{}", uuid::Uuid::new_v4());
            Some(settings)
        }
        other => anyhow::bail!("unknown log backend {other}; expected embedded or kafka"),
    };
    let config = NodeConfig {
        data_dir: scratch.path().join("node"),
        kek_file: None,
        kafka: kafka.clone(),
        url: Some("http://127.0.0.1/fhir".to_owned()),
    };
    let node = Node::open(&config).await?;
    let key_dir = config.key_paths().dir;
    let issuer = DevIssuer::open_or_create(&key_dir)?;
    let jwks = key_dir.join("bench-jwks.json");
    std::fs::write(&jwks, issuer.jwks_json())?;
    let authenticator = Authenticator::from_config(&[IssuerConfig {
        issuer: dev_issuer::ISSUER.into(),
        audience: dev_issuer::AUDIENCE.into(),
        jwks_file: Some(jwks),
        jwks_url: None,
    }])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let state = AppState::new(
        &node,
        Arc::new(authenticator),
        &format!("http://{address}/fhir"),
    );
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            api::app(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    let token: Arc<str> = issuer
        .mint("bench", &["physician"], Duration::from_secs(3600))?
        .into();

    // One patient per connection, so writes spread over as many charts.
    let mut setup = Connection::open(address).await?;
    let mut patients = Vec::new();
    for index in 0..args.connections {
        let body = format!(
            r#"{{"resourceType":"Patient","name":[{{"family":"Bench{index}"}}],"birthDate":"1980-01-01"}}"#
        );
        let (status, reply) = setup
            .request("POST", "/fhir/Patient", &token, &body)
            .await?;
        anyhow::ensure!(
            status == 201,
            "patient create returned status {status}, expected 201"
        );
        let value: serde_json::Value = serde_json::from_str(&reply)?;
        patients.push(value["id"].as_str().context("patient id")?.to_owned());
    }
    let patients: Arc<Vec<String>> = Arc::new(patients);
    let duration = Duration::from_secs(args.seconds);

    let written: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let write_step = {
        let (token, patients, written) = (token.clone(), patients.clone(), written.clone());
        move |worker: usize, index: u64, mut connection: Connection| {
            let (token, patients, written) = (token.clone(), patients.clone(), written.clone());
            async move {
                let body = observation(&patients[worker], index);
                let (status, reply) = connection
                    .request("POST", "/fhir/Observation", &token, &body)
                    .await?;
                anyhow::ensure!(
                    status == 201,
                    "write returned status {status}, expected 201"
                );
                if index % 16 == 0 {
                    if let Some(id) =
                        serde_json::from_str::<serde_json::Value>(&reply)?["id"].as_str()
                    {
                        written
                            .lock()
                            .expect("bench id list lock")
                            .push(id.to_owned());
                    }
                }
                Ok((connection, index))
            }
        }
    };
    let counters = node.writer.append_counters();
    let appends_before = (
        counters.batches.load(Ordering::Relaxed),
        counters.events.load(Ordering::Relaxed),
    );
    let cpu_before_writes = CpuReading::now(args.broker_pid);
    let writes = run_phase(
        address,
        args.connections,
        duration,
        None,
        write_step.clone(),
    )
    .await?;
    let write_cpu = CpuReading::now(args.broker_pid)
        .per_operation(&cpu_before_writes, writes.latencies_micros.len() as f64);
    // The envelope size of a typical write, measured from the log itself while it holds
    // writes alone (on Kafka, offsets count transaction markers too).
    let sample = {
        let log = node.log.clone();
        let middle = node.log.end_position().borrow().get(0) / 2;
        tokio::task::spawn_blocking(move || {
            log.read_from(chartlog::log::LogPosition::new(0, middle), 64)
        })
        .await??
    };
    // The median, so that an odd entry among them (a chart's first event) does not count.
    let mut sizes: Vec<usize> = sample
        .iter()
        .map(|(_, envelope)| envelope.0.len())
        .collect();
    sizes.sort_unstable();
    let envelope_bytes = sizes.get(sizes.len() / 2).copied().unwrap_or(600);
    // The batch size the writer formed under saturation: the baselines run at it too.
    let appended_batches = counters.batches.load(Ordering::Relaxed) - appends_before.0;
    let appended_events = counters.events.load(Ordering::Relaxed) - appends_before.1;
    let mean_batch = (appended_events as f64 / appended_batches.max(1) as f64)
        .round()
        .max(1.0) as usize;
    let ids: Arc<Vec<String>> = Arc::new(written.lock().expect("bench id list lock").clone());
    anyhow::ensure!(!ids.is_empty(), "no observations were written");

    let read_step = {
        let (token, ids) = (token.clone(), ids.clone());
        move |_worker: usize, index: u64, mut connection: Connection| {
            let (token, ids) = (token.clone(), ids.clone());
            async move {
                let id = &ids[(index as usize) % ids.len()];
                let (status, _) = connection
                    .request("GET", &format!("/fhir/Observation/{id}"), &token, "")
                    .await?;
                anyhow::ensure!(status == 200, "read returned status {status}, expected 200");
                Ok((connection, index))
            }
        }
    };
    let reads = run_phase(address, args.connections, duration, None, read_step.clone()).await?;

    let half_writes = run_phase(
        address,
        args.connections,
        duration,
        Some(writes.per_second() / 2.0),
        write_step.clone(),
    )
    .await?;
    let half_reads = run_phase(
        address,
        args.connections,
        duration,
        Some(reads.per_second() / 2.0),
        read_step.clone(),
    )
    .await?;
    let paced_writes = run_phase(
        address,
        args.connections,
        duration,
        Some(args.write_rate),
        write_step,
    )
    .await?;
    let paced_reads = run_phase(
        address,
        args.connections,
        duration,
        Some(args.read_rate),
        read_step,
    )
    .await?;

    // The baselines append envelopes of the same size to a log of the same kind, without the
    // HTTP, FHIR, encryption and projection work around it.
    let open_baseline = |name: &str| -> anyhow::Result<Box<dyn EventLog>> {
        match &kafka {
            None => Ok(Box::new(EmbeddedLog::open(
                &scratch.path().join(name),
                true,
            )?)),
            Some(settings) => {
                let mut settings = settings.clone();
                settings.topic = format!("{}-{name}", settings.topic);
                let log = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(KafkaLog::open(settings))
                })?;
                Ok(Box::new(log))
            }
        }
    };
    let single_log = open_baseline("baseline-1")?;
    let baseline_single =
        tokio::task::block_in_place(|| baseline(single_log.as_ref(), envelope_bytes, duration, 1))?;
    let batched_log = open_baseline("baseline-64")?;
    let baseline_batched = tokio::task::block_in_place(|| {
        baseline(batched_log.as_ref(), envelope_bytes, duration, 64)
    })?;
    let same_batch_log = open_baseline("baseline-same")?;
    let cpu_before_baseline = CpuReading::now(args.broker_pid);
    let baseline_same = tokio::task::block_in_place(|| {
        baseline(
            same_batch_log.as_ref(),
            envelope_bytes,
            duration,
            mean_batch,
        )
    })?;
    let baseline_cpu = CpuReading::now(args.broker_pid)
        .per_operation(&cpu_before_baseline, baseline_same * duration.as_secs_f64());
    let (unit, raw) = match kafka {
        None => ("sync", "raw RocksDB synced appends"),
        Some(_) => (
            "transaction",
            "raw Kafka transactional appends (acks=all, idempotent)",
        ),
    };

    server.abort();
    println!(
        "chartlog-bench: {} connections, {} s per phase, envelopes of {envelope_bytes} bytes",
        args.connections, args.seconds
    );
    println!(
        "chart writes, saturated: {appended_events} events in {appended_batches} appends, {mean_batch} per {unit} on average"
    );
    println!("| measurement | per second | p50 ms | p99 ms | ratio to 1-per-{unit} baseline | ratio to {mean_batch}-per-{unit} baseline | ratio to 64-per-{unit} baseline |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let row = |name: &str, stats: &Stats| {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            stats.per_second(),
            stats.percentile_ms(0.50),
            stats.percentile_ms(0.99),
            stats.per_second() / baseline_single,
            stats.per_second() / baseline_same,
            stats.per_second() / baseline_batched
        );
    };
    row("chart writes, saturated", &writes);
    row("audited reads, saturated", &reads);
    row("chart writes, half of measured", &half_writes);
    row("audited reads, half of measured", &half_reads);
    row(
        &format!("chart writes, offered {:.0}/s", args.write_rate),
        &paced_writes,
    );
    row(
        &format!("audited reads, offered {:.0}/s", args.read_rate),
        &paced_reads,
    );
    println!(
        "| {raw}, 1 per {unit} | {baseline_single:.0} | | | 1.00 | {:.2} | {:.2} |",
        baseline_single / baseline_same,
        baseline_single / baseline_batched
    );
    println!(
        "| {raw}, {mean_batch} per {unit} | {baseline_same:.0} | | | {:.2} | 1.00 | {:.2} |",
        baseline_same / baseline_single,
        baseline_same / baseline_batched
    );
    println!(
        "| {raw}, 64 per {unit} | {baseline_batched:.0} | | | {:.2} | {:.2} | 1.00 |",
        baseline_batched / baseline_single,
        baseline_batched / baseline_same
    );
    // Where the CPU goes: what one write costs against one envelope of the bare log, and the
    // rate at which that cost alone would fill every core.
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let format_ms =
        |value: Option<f64>| value.map_or_else(|| "n/a".to_owned(), |ms| format!("{ms:.3}"));
    println!();
    println!("| measurement | per second | CPU ms per operation, bench process | CPU ms per operation, broker | rate that would fill {cores:.0} cores |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let cpu_row = |name: &str, rate: f64, (process, broker): (Option<f64>, Option<f64>)| {
        let total = process.map(|process| process + broker.unwrap_or(0.0));
        let ceiling = total.filter(|total| *total > 0.0).map_or_else(
            || "n/a".to_owned(),
            |total| format!("{:.0}", cores * 1000.0 / total),
        );
        println!(
            "| {name} | {rate:.0} | {} | {} | {ceiling} |",
            format_ms(process),
            format_ms(broker)
        );
    };
    cpu_row("chart writes, saturated", writes.per_second(), write_cpu);
    cpu_row(
        &format!("{raw}, {mean_batch} per {unit}"),
        baseline_same,
        baseline_cpu,
    );
    node.shutdown().await;
    Ok(())
}
